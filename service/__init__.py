"""alora-serve's HTTP layer: a thin FastAPI service over `alora_core.Engine` (see docs/api.md)."""

from importlib import metadata


def package_version() -> str:
    """The installed distribution's version (package metadata: pyproject's `version`, one source for
    `alora-serve --version`, the OpenAPI document and `alora_build_info`); "unknown" when this source
    tree was never installed."""
    try:
        return metadata.version("alora-serve")
    except metadata.PackageNotFoundError:
        return "unknown"
