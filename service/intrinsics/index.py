"""`alora-adapter-index URL OUT`: write the directory Mellea's `OpenAIBackend(adapter_source=OUT)`
reads, for the adapters a running server serves (Mellea reads only a local directory or a Hub
repo, so the server cannot just publish a URL):

    OUT/adapter_index.json            {"adapters": [{"adapter_name", "technology", "io_config"}]}
    OUT/io_configs/<name>/io.yaml     the server's io.yaml, as written (GET /adapters `io_yaml`)

Every name the server answers to (aliases too) gets an entry; adapters without io.yaml get none
(Mellea cannot call them as intrinsics).
"""

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

INDEX_FILE = "adapter_index.json"


def adapter_index(adapters: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(adapter_index.json's content, {relative io.yaml path: text}) from GET /adapters' list."""
    entries, files = [], {}
    for adapter in adapters:
        if adapter.get("io_yaml") is None:
            continue
        name = adapter["name"]
        path = f"io_configs/{name}/io.yaml"
        entries.append({"adapter_name": name, "technology": adapter["kind"], "io_config": path})
        files[path] = adapter["io_yaml"]
    return {"adapters": entries}, files


def write_index(out: Path, adapters: list[dict[str, Any]]) -> list[str]:
    """Write the directory; returns the adapter names indexed."""
    index, files = adapter_index(adapters)
    for relative, text in files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [e["adapter_name"] for e in index["adapters"]]


def fetch_adapters(url: str, api_key: str | None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + "/adapters", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    adapters: list[dict[str, Any]] = response.json()["adapters"]
    return adapters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write Mellea's adapter directory (adapter_index.json + io_configs/) for a server's adapters."
    )
    parser.add_argument("url", help="the server's root URL, e.g. http://127.0.0.1:8000 (not .../v1)")
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--api-key", default=None, help="an API key of the server, if it needs one")
    args = parser.parse_args(argv)
    try:
        names = write_index(args.out, fetch_adapters(args.url, args.api_key))
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot read {args.url}/adapters: {exc}") from None
    print(f"wrote {args.out / INDEX_FILE}: {', '.join(names) or 'no adapter with an io.yaml'}")


if __name__ == "__main__":
    main()
