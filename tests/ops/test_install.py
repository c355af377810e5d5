"""The install paths users take, for real: a fresh virtualenv, the Docker image's own install line
(`pip install -c constraints/cpu.txt .`, read from deploy/Dockerfile: no extras, so no triton and no
test tools) run on the files the image's COPY lines take, then `alora-serve` with no arguments (the
offline demo, built by the installed package) answering the README's example calls exactly as
documented. The same for the wheel `python -m build` makes, installed into another fresh virtualenv.

Slow (two installs of torch and the service's dependencies, ~1-2 min each; pip reuses its cache and
takes torch from the CPU pin), and they need a package index (PyPI, or a mirror pip is configured
with), as `make test` does."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.ops.conftest import ROOT
from tests.ops.test_containers import copies, service_install
from tests.service.conftest import ServerProcess
from tests.service.test_readme import front_page_calls, replay

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
INSTALL_TIMEOUT_S = 1800  # a cold pip cache on a slow link downloads a few hundred MB

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """This process's environment without what would leak the checkout or the test venv into the
    fresh one (PYTHONPATH, VIRTUAL_ENV, ALORA_* settings)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env = {k: v for k, v in env.items() if not k.startswith("ALORA_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}


def run(command: list[str | Path], cwd: Path) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def docker_context(out: Path) -> Path:
    """The files the CPU image's COPY instructions put in its WORKDIR, laid out the same way."""
    for source, destination in copies("cpu"):
        target = out / destination
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target)
    return out


def fresh_venv(path: Path) -> Path:
    """`python -m venv PATH` (no system site-packages: nothing of the test environment); its python."""
    run([sys.executable, "-m", "venv", path], cwd=path.parent)
    return path / "bin" / "python"


def pip_install(python: Path, install: list[str], cwd: Path) -> None:
    # -q --no-compile: quiet, and no .pyc of every torch module up front (half the install's CPU
    # time); what is installed is the same
    run([python, "-m", "pip", "install", "-q", "--no-compile", *install], cwd=cwd)


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docker_context(tmp_path_factory.mktemp("docker-context"))


@pytest.fixture(scope="session")
def wheel(context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes of the project (from the image's files, in a copy, so the
    checkout gets no build/ or egg-info)."""
    source = docker_context(tmp_path_factory.mktemp("wheel-source"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", out, source], cwd=source)
    (built,) = out.glob("alora_serve-*.whl")
    return built


def check_install(python: Path, tmp_path: Path) -> None:
    """The installed package: the right version, no triton and no test tool, imported from the venv;
    `alora-serve` (offline demo) answers the README's example calls as documented."""
    bin_dir = python.parent
    version = run([bin_dir / "alora-serve", "--version"], cwd=tmp_path)
    assert version == f"alora-serve {PYPROJECT['project']['version']}\n"
    probe = run(
        [
            python,
            "-c",
            "import importlib.util, service, alora_core; "
            "from alora_core.model import cpu_kernels; "
            "print(service.__file__); print(importlib.util.find_spec('triton') is None); "
            "print(all(s.is_file() for s in cpu_kernels.SOURCES)); print(cpu_kernels.load() is not None)",
        ],
        cwd=tmp_path,
    ).split()
    assert probe[0].startswith(str(bin_dir.parent)), probe  # the installed copy, not the checkout
    assert probe[1] == "True", "a plain install has no triton (only the test extra and CUDA torch bring it)"
    # the CPU kernels' sources ship in the package and build there (a compiler is on this machine)
    assert probe[2:] == ["True", "True"], probe
    assert not installed_test_tools(python, tmp_path)

    server = ServerProcess(
        [],
        tmp_path / "server.log",
        env={"ALORA_CACHE_DIR": str(tmp_path / "cache")},
        command=[str(bin_dir / "alora-serve")],
        cwd=tmp_path,
    ).start()
    try:
        calls = front_page_calls()
        paths = {path for _, path, _, _ in calls}
        assert "/generate" in paths and any(p.startswith("/intrinsic/") for p in paths)
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            replay(client, calls)
    finally:
        server.stop()
    assert "triton" not in server.log().lower()


# Run in the fresh venv: which of the names in argv are installed distributions that no installed
# distribution requires (pyyaml comes with transformers: a runtime dependency, not a test tool).
UNREQUIRED = """
import re, sys
from importlib import metadata
name = lambda r: re.split(r"[<>=!~;\\[ (]", r, maxsplit=1)[0].strip().lower().replace("_", "-")
dists = {name(d.metadata["Name"]) for d in metadata.distributions()}
required = {name(r) for d in metadata.distributions() for r in d.requires or [] if "extra ==" not in r}
print(" ".join(n for n in map(name, sys.argv[1:]) if n in dists and n not in required))
"""


def installed_test_tools(python: Path, cwd: Path) -> set[str]:
    """Packages of the `test` extra that are in the venv though nothing there requires them."""
    extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    return set(run([python, "-c", UNREQUIRED, *extra], cwd=cwd).split())


def test_the_image_install_line_serves_the_demo(context: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, service_install("cpu"), cwd=context)
    check_install(python, tmp_path)


def test_the_wheel_serves_the_demo(context: Path, wheel: Path, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv")
    install = [str(wheel) if a == "." else a for a in service_install("cpu")]  # the wheel for the source
    pip_install(python, install, cwd=context)
    check_install(python, tmp_path)
