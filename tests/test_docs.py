"""The documentation: the mkdocs site builds with no warning (broken links and anchors are warnings,
see mkdocs.yml), the README's links resolve, and every results file the README and docs/ cite is in
the repository (GPU runs' JSON may be committed: .gitignore lets it in)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.ops.conftest import require_installed

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# a results path: loadtest/results/... with an extension (a file) or a trailing / (a folder), or a
# bare benchmark JSON name; extensionless ones are output prefixes of commands (--csv loadtest/results/agents)
RESULTS = re.compile(r"loadtest/results/[\w./-]*(?:\.\w+|/)|(?<![\w/])bench_\w+\.json")
# Named by the docs as where a run is to write its results (no numbers quoted from it yet): page ->
# path. Once the file is committed, its entry goes.
DESTINATIONS = {("docs/gpu-attention.md", "loadtest/results/gpu/bench_gpu.json")}


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    require_installed("mkdocs")
    require_installed("material")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"\w+:", link)]
    assert "docs/index.md" in local
    missing = [link for link in local if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    assert not [link for link in local if "#" in link], (
        "anchors into docs/: link the page (GitHub and mkdocs slugs differ)"
    )


def cited_results() -> dict[str, list[str]]:
    """Results path -> the pages citing it."""
    cited: dict[str, list[str]] = {}
    for page in PAGES:
        for path in RESULTS.findall(page.read_text()):
            cited.setdefault(path, []).append(str(page.relative_to(ROOT)))
    return cited


def test_every_cited_results_file_is_in_the_repository() -> None:
    cited = cited_results()
    assert "loadtest/results/bench_batching_bf16.json" in cited  # the pattern does find citations
    missing = {}
    for path, pages in cited.items():
        candidates = [ROOT / path] if "/" in path else [ROOT / "loadtest/results" / path]
        citing = [page for page in pages if (page, path) not in DESTINATIONS]
        if citing and not any(c.exists() for c in candidates):
            missing[path] = citing
    assert not missing, f"results cited but not in the repository: {missing}"
    for page, path in DESTINATIONS:
        assert path in cited and page in cited[path], (
            f"{page} no longer names {path}: drop it from DESTINATIONS"
        )
        assert not (ROOT / path).exists(), f"{path} is committed now: drop it from DESTINATIONS"


def test_gpu_results_can_be_committed() -> None:
    """loadtest/results/ is ignored but for the committed results; GPU runs' JSON is let in."""

    def ignored(path: str) -> bool:
        done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
        assert done.returncode in (0, 1), f"git check-ignore failed on {path}"
        return done.returncode == 0

    assert not ignored("loadtest/results/gpu/bench_gpu.json")
    assert not ignored("loadtest/results/bench_core.json")
    assert ignored("loadtest/results/gpu/session.log")
    assert ignored("loadtest/results/agents_stats.csv")
