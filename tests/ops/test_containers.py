"""deploy/: the Dockerfile, docker-compose, Prometheus and Grafana provisioning, checked statically (no
Docker engine here): the files parse, and every stage, image, port, path, command and ALORA_*
variable they name exists in the project and is accepted by the service's Settings."""

import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.loading import DEMO_SUBDIR
from service.settings import Settings, env_var
from tests.ops.conftest import ROOT, require

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
VARIANTS = ("cpu", "cuda")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SETTINGS_ENV = {env_var(name) for name in Settings.model_fields}
# How both images install the service: the project without extras, under the torch pin (what `make`
# uses too). tests/ops/test_install.py runs the Dockerfile's line, which must be this one.
TESTED_INSTALL = ["-c", "constraints/cpu.txt", "."]


def yaml_file(path: Path) -> Any:
    yaml = require("yaml")
    return yaml.safe_load(path.read_text())


def instructions(variant: str) -> list[dict[str, Any]]:
    parser = require("dockerfile_parse").DockerfileParser(
        path=str(DOCKERFILE), build_args={"VARIANT": variant}
    )
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages(variant: str) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(image or parent stage, stage name, its instructions) per FROM, args substituted."""
    args = {}
    out: list[tuple[str, str, list[dict[str, Any]]]] = []
    for i in instructions(variant):
        if i["instruction"] == "ARG" and not out:
            name, _, default = i["value"].partition("=")
            args[name] = default
        elif i["instruction"] == "FROM":
            image, _, name = i["value"].partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: {**args, "VARIANT": variant}[m.group(1)], image)
            out.append((image, name, []))
        elif out:
            out[-1][2].append(i)
    return out


def chain(variant: str) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The stages the `variant` image is built from, base first (the runtime stage last)."""
    by_name = {name: stage for stage in stages(variant) for name in [stage[1]]}
    out = [stages(variant)[-1]]
    while out[0][0] in by_name:
        out.insert(0, by_name[out[0][0]])
    return out


def copies(variant: str) -> list[tuple[str, str]]:
    """(source, destination) of every COPY of the variant's stages, relative to the build context
    and the WORKDIR."""
    out = []
    for _, _, body in chain(variant):
        for i in body:
            if i["instruction"] == "COPY":
                *sources, destination = i["value"].split()
                for source in sources:
                    out.append(
                        (
                            source,
                            f"{destination}{Path(source).name}" if destination.endswith("/") else destination,
                        )
                    )
    return out


def pip_installs(body: list[dict[str, Any]]) -> list[list[str]]:
    """The arguments after `pip install` of every pip command that a stage's instructions run."""
    commands = [shlex.split(c) for i in body if i["instruction"] == "RUN" for c in i["value"].split("&&")]
    return [words[2:] for words in commands if words[:2] == ["pip", "install"]]


def service_install(variant: str) -> list[str]:
    """The runtime stage's one install, of the service itself: what tests/ops/test_install.py runs."""
    (install,) = pip_installs(chain(variant)[-1][2])
    return install


def docker_ignored(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore keeps `path` out of the build context (last match wins)."""
    ignored = False
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[: n + 1])) for n in range(len(parts))):
            ignored = not negate
    return ignored


def project_files(directory: str) -> list[str]:
    return [
        str(p.relative_to(ROOT))
        for p in (ROOT / directory).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]


def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and tag not in ("", "latest") and "/" not in tag


def check_settings_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ALORA_* variable names a Settings field, and together they make valid Settings."""
    alora = {k: str(v) for k, v in env.items() if k.startswith("ALORA_")}
    unknown = set(alora) - SETTINGS_ENV
    assert not unknown, f"not service settings: {sorted(unknown)}"
    for name in [k for k in os.environ if k.startswith("ALORA_")]:
        monkeypatch.delenv(name)
    for name, value in alora.items():
        monkeypatch.setenv(name, value)
    Settings()


@pytest.mark.parametrize("variant", VARIANTS)
def test_dockerfile_stages_images_and_copied_paths_exist(variant: str) -> None:
    chain = stages(variant)
    names = {name for _, name, _ in chain}
    for image, _, body in chain:
        assert image in names or pinned(image), f"base image {image} is not a stage or a pinned image"
        for i in body:
            if i["instruction"] == "COPY":
                *sources, _ = i["value"].split()
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the project"
                    files = [source] if (ROOT / source).is_file() else project_files(source)
                    assert files and not [f for f in files if docker_ignored(f)], f"COPY {source}: ignored"
    runtime = chain[-1]
    parent = runtime[0]
    assert parent == f"torch-{variant}" and parent in names
    assert docker_ignored(".venv/bin/python") and docker_ignored("service/__pycache__/app.cpython-311.pyc")


def test_dockerfile_runtime_is_non_root_healthy_and_uses_real_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = stages("cpu")[-1][2]
    by_kind: dict[str, list[str]] = {}
    for i in body:
        by_kind.setdefault(i["instruction"], []).append(i["value"])
    (user,) = by_kind["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    env: dict[str, str] = {}
    for value in by_kind["ENV"]:
        env.update(dict(re.findall(r"(\w+)=(\S+)", value)))
    check_settings_env(env, monkeypatch)
    port = Settings.model_fields["port"].default
    assert by_kind["EXPOSE"] == [str(port)] and env["ALORA_PORT"] == str(port)
    (healthcheck,) = by_kind["HEALTHCHECK"]
    assert "/health" in healthcheck and "ALORA_PORT" in healthcheck
    (entrypoint,) = by_kind["ENTRYPOINT"]
    scripts = PYPROJECT["project"]["scripts"]
    assert entrypoint == '["alora-serve"]' and "alora-serve" in scripts
    # the demo baked at build time is where the service looks for it (no build at start-up)
    demo_runs = [v for v in by_kind["RUN"] if v.startswith("alora-make-demo")]
    assert demo_runs == [f"alora-make-demo {env['ALORA_CACHE_DIR']}/{DEMO_SUBDIR} --preset tiny"]
    assert "alora-make-demo" in scripts
    for path in re.findall(
        r"-c (\S+)", " ".join(v for _, _, b in stages("cpu") for v in (i["value"] for i in b))
    ):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_install_the_tested_line_and_no_test_tools(variant: str) -> None:
    """Both images install the service with one line, `pip install -c constraints/cpu.txt .`: the
    project without extras, under the torch pin the torch stage used (and `make` uses). That line is
    what tests/ops/test_install.py runs in a fresh virtualenv. No stage installs an extra, a test
    tool or a requirements file, and the tests never enter the build context."""
    assert service_install(variant) == TESTED_INSTALL, "the image's install line is not the tested one"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints/cpu.txt$", makefile, flags=re.M)  # make's default pin
    assert ("constraints/cpu.txt", "constraints/cpu.txt") in copies(variant)
    test_tools = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
        for r in PYPROJECT["project"]["optional-dependencies"]["test"]
    }
    for args in (args for _, _, body in chain(variant) for args in pip_installs(body)):
        assert not any("[" in a for a in args), f"pip install {args}: no extras in the images"
        assert not {"-r", "--requirement", "-e", "--editable"} & set(args), args
        assert not test_tools & {a.lower() for a in args}, f"pip install {args}: a test tool"
        if "torch" in args:
            pin = TESTED_INSTALL[:2]
            assert any(args[i : i + 2] == pin for i in range(len(args))), f"pip install {args}: not pinned"
    assert not [source for source, _ in copies(variant) if source.split("/")[0] == "tests"]
    assert docker_ignored("tests/conftest.py")


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_carry_a_c_compiler_for_the_cpu_kernels(variant: str) -> None:
    """The CPU attention kernel is compiled at start-up for the CPU it runs on: each image has gcc and
    the C library headers, and a writable cache for the build under /tmp (read-only root filesystem)."""
    runs = " ".join(i["value"] for _, _, body in chain(variant) for i in body if i["instruction"] == "RUN")
    installs = re.findall(r"apt-get install [^&]*", runs)
    assert any("gcc" in line and "libc6-dev" in line for line in installs), installs
    env: dict[str, str] = {}
    for _, _, body in chain(variant):
        for i in body:
            if i["instruction"] == "ENV":
                env.update(dict(re.findall(r"(\w+)=(\S+)", i["value"])))
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")


def test_compose_services_are_built_here_and_wired_together(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml_file(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"alora", "redis", "prometheus", "grafana"}
    alora = services["alora"]
    assert (DEPLOY / alora["build"]["context"] / alora["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert alora["build"]["args"]["VARIANT"] == "cpu"
    assert alora["image"] == f"alora-serve:{VERSION}-cpu"
    check_settings_env(alora["environment"], monkeypatch)
    redis_url = urlsplit(alora["environment"]["ALORA_REDIS_URL"])
    assert redis_url.hostname == "redis" and redis_url.port == 6379
    port = Settings.model_fields["port"].default
    assert [p.split(":")[-1] for p in alora["ports"]] == [str(port)]
    for name, service in services.items():
        if name != "alora":
            assert pinned(service["image"]), service["image"]
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert (DEPLOY / host).exists(), f"{name}: volume {host} is not in the project"
        for dependency in service.get("depends_on", []):
            assert dependency in services

    gpu = yaml_file(DEPLOY / "docker-compose.gpu.yml")["services"]["alora"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["image"] == f"alora-serve:{VERSION}-cuda"
    check_settings_env({**alora["environment"], **gpu["environment"]}, monkeypatch)


def test_prometheus_scrapes_the_service_metrics_route() -> None:
    from service.app import create_app

    compose = yaml_file(DEPLOY / "docker-compose.yml")
    prometheus = compose["services"]["prometheus"]
    (config_path,) = [a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")]
    mounts = {container: host for host, container, *_ in (v.split(":") for v in prometheus["volumes"])}
    (job,) = yaml_file(DEPLOY / mounts[config_path])["scrape_configs"]
    assert job["metrics_path"] in create_app(Settings()).openapi()["paths"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert int(port) == Settings.model_fields["port"].default


def test_grafana_provisions_the_datasource_and_the_dashboards() -> None:
    compose = yaml_file(DEPLOY / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = {
        container.split(":")[0]: host for host, container in (v.split(":", 1) for v in grafana["volumes"])
    }
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml_file(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert url.hostname in compose["services"] and url.hostname == "prometheus"
    assert any(p.endswith(f":{url.port}") for p in compose["services"]["prometheus"]["ports"])
    (provider,) = yaml_file(provisioning / "dashboards" / "alora-serve.yml")["providers"]
    dashboards_dir = DEPLOY / mounts[provider["options"]["path"]]
    assert dashboards_dir.resolve() == (DEPLOY / "grafana" / "dashboards").resolve()
    assert len(list(dashboards_dir.glob("*.json"))) == 3
