"""What the service loads at startup: the model and adapters the settings name, or the offline demo.

--model M  [--adapter N=P ...] [--adapters-dir D]  -> M, adapters from both
no --model                                         -> demo built once under --cache-dir,
                                                      with the demo's adapters dir
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from alora_core import Engine, EngineConfig, threads
from alora_core.errors import AdapterLoadError
from alora_core.fixtures import ALIASES_FILE, write_demo
from service.outputs import OUTPUT_FORMAT_FILE, JsonFormat, LabelsFormat, NumberFormat, load_output_format
from service.settings import Settings

log = logging.getLogger(__name__)

DEMO_SUBDIR = "demo"
DEMO_MODEL_NAME = "alora-demo"  # the offline demo's served model name (OpenAI API)
ADAPTER_CONFIG = "adapter_config.json"

OutputFormats = dict[str, LabelsFormat | NumberFormat | JsonFormat | None]


@dataclass(frozen=True)
class Sources:
    model: str
    adapters: dict[str, Path]
    demo: bool  # the random-weight offline demo
    served_model_names: tuple[str, ...] = ()  # the base model's names in the OpenAI API
    aliases: dict[str, str] = field(default_factory=dict)  # other name -> adapter (the demo's old names)


def resolve_sources(settings: Settings) -> Sources:
    model = settings.model
    adapters_dir = settings.adapters_dir
    demo = model is None
    if model is None:
        paths = write_demo(settings.cache_dir / DEMO_SUBDIR, preset="tiny")
        model = str(paths.model)
        adapters_dir = adapters_dir or paths.root / "adapters"
        log.warning(
            "no --model given: serving the offline DEMO model from %s. Its weights are RANDOM: "
            "outputs are meaningless text, but every code path (KV reuse, aLoRA, LoRA) is real. "
            "Pass --model DIR (and --adapter / --adapters-dir) to serve a real model.",
            paths.root,
        )
    adapters = discover_adapters(adapters_dir) if adapters_dir is not None else {}
    aliases = read_aliases(adapters_dir) if adapters_dir is not None else {}
    for name, path in settings.adapter.items():
        if name in aliases:
            raise AdapterLoadError(
                f"adapter {name!r} is given twice: --adapter {path} and as an alias of "
                f"{aliases[name]!r} in {ALIASES_FILE}"
            )
        if name in adapters and adapters[name] != path:
            raise AdapterLoadError(
                f"adapter {name!r} is given twice: --adapter {path} and {adapters[name]} in --adapters-dir"
            )
        adapters[name] = path
    served = tuple(settings.served_model_name) or (DEMO_MODEL_NAME if demo else Path(model).name,)
    missing = sorted(new for new in aliases.values() if new not in adapters)
    if missing:
        raise AdapterLoadError(f"{ALIASES_FILE} names adapter(s) {missing}, which are not served")
    clash = sorted(set(served) & (set(adapters) | set(aliases)))
    if clash:
        raise AdapterLoadError(
            f"adapter name(s) {clash} equal a served model name: `model` could not tell them apart "
            "(rename the adapter or set --served-model-name)"
        )
    return Sources(model=model, adapters=adapters, demo=demo, served_model_names=served, aliases=aliases)


def discover_adapters(adapters_dir: Path) -> dict[str, Path]:
    """Each subdirectory holding an adapter_config.json is an adapter named after the folder."""
    if not adapters_dir.is_dir():
        raise AdapterLoadError(f"--adapters-dir {adapters_dir} is not a directory")
    found = {d.name: d for d in sorted(adapters_dir.iterdir()) if (d / ADAPTER_CONFIG).is_file()}
    if not found:
        log.warning(
            "--adapters-dir %s holds no adapter (no subdirectory with %s)", adapters_dir, ADAPTER_CONFIG
        )
    return found


def read_aliases(adapters_dir: Path) -> dict[str, str]:
    """adapters_dir/aliases.json: {other name: adapter name} (e.g. names kept after a rename)."""
    path = adapters_dir / ALIASES_FILE
    if not path.is_file():
        return {}
    try:
        aliases = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise AdapterLoadError(f"{path}: must be an object of alias name -> adapter name")
    return aliases


def build_engine(settings: Settings, sources: Sources) -> Engine:
    config = EngineConfig(
        model=sources.model,
        trust_remote_code=settings.trust_remote_code,
        device=settings.device,
        dtype=settings.dtype,
        block_size=settings.block_size,
        kv_cache_bytes=int(settings.kv_cache_bytes),
        kv_cache_fraction=settings.kv_cache_fraction,
        device_cache_bytes=None if settings.device_cache_bytes is None else int(settings.device_cache_bytes),
        host_cache_bytes=int(settings.host_cache_bytes),
        redis_url=settings.redis_url,
        redis_ttl_s=settings.redis_ttl_s,
        restore_policy=settings.restore_policy,
        max_model_len=settings.max_model_len,
        max_conversations=settings.max_conversations,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        max_waiting=settings.max_waiting,
    )
    # on a thread of its own: the start-up forwards (calibration, probe) leave no OpenMP team behind
    return threads.run_on_short_lived_thread(
        lambda: Engine.from_config(config, adapters=dict(sources.adapters), aliases=sources.aliases)
    )


def load_output_formats(engine: Engine, with_io_yaml: set[str]) -> OutputFormats:
    """Legacy alora_output.json sidecars (deprecated: io.yaml replaces them); both -> refused."""
    formats = {}
    for adapter in engine.adapters.all():
        name, path = adapter.spec.name, adapter.spec.path
        fmt = load_output_format(path)
        if fmt is not None:
            if name in with_io_yaml:
                raise AdapterLoadError(
                    f"{path}: has both io.yaml and the deprecated {OUTPUT_FORMAT_FILE}: delete the latter"
                )
            log.warning(
                "%s: %s is deprecated, write an io.yaml instead (see docs/intrinsics.md)",
                path / OUTPUT_FORMAT_FILE,
                OUTPUT_FORMAT_FILE,
            )
        formats[name] = fmt
    return formats
