"""The service's one configuration object. Every field is both a CLI flag and an `ALORA_*` env var:

    field max_model_len  ->  --max-model-len 4096   |   ALORA_MAX_MODEL_LEN=4096

Precedence: flag > environment > default. Repeatable flags (`--adapter`, `--api-key`) take one value
per use; their env vars take comma-separated values (`ALORA_ADAPTER=a=/x,b=/y`).
"""

import argparse
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import ByteSize, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from alora_core.kvcache import redis_url
from service import package_version

ENV_PREFIX = "ALORA_"
REPEATABLE = frozenset({"adapter", "api_key", "served_model_name"})  # flags given once per value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    model: str | None = Field(
        None,
        description="Base model directory (Hugging Face layout). Default: the offline demo model "
        "(random weights), built once under --cache-dir.",
    )
    adapter: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="Adapter NAME=PATH (a PEFT LoRA or aLoRA directory); repeatable.",
    )
    adapters_dir: Path | None = Field(
        None, description="Directory whose subdirectories are adapters, each named after its folder."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own Python code (custom architectures); the start-up "
        "probe checks it like any other model.",
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Name of the base model in the OpenAI API (`model` of /v1 requests, GET /v1/models); "
        "repeatable, the first is the one responses and adapter cards name. Default: the model "
        "directory's name (`alora-demo` for the offline demo).",
    )
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Model and KV dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest context + output in tokens. Default: the model's maximum."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    kv_cache_bytes: ByteSize = Field(
        ByteSize(1 << 30), description="Device KV-cache budget, e.g. 1GiB or 512MiB."
    )
    kv_cache_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Size the device KV pool as this fraction of the device's free memory at start "
        "(overrides --kv-cache-bytes), e.g. 0.8.",
    )
    device_cache_bytes: ByteSize | None = Field(
        None,
        description="KV that no running request uses (cached blocks, idle conversations) kept in the "
        "device pool; beyond it the least recently used blocks are demoted to the host tier / Redis. "
        "Default: the whole pool.",
    )
    host_cache_bytes: ByteSize = Field(
        ByteSize(1 << 30),
        description="Host tier for KV blocks demoted from the device (pinned memory with CUDA), "
        "e.g. 8GiB; 0 = none.",
    )
    max_conversations: int = Field(
        10_000,
        ge=1,
        description="Conversation handles kept before the least recently used is dropped (its KV "
        "stays cached); requests without a conversation id make none.",
    )
    max_num_seqs: int = Field(
        64,
        ge=1,
        le=4096,
        description="Sequences batched per forward (1 = no batching). A request with n choices takes n "
        "(one with more than this many runs alone).",
    )
    max_num_batched_tokens: int = Field(
        512, ge=1, description="New tokens per forward, all sequences together (bounds decode latency)."
    )
    prefill_chunk_tokens: int = Field(512, ge=1, description="New tokens of one sequence per forward.")
    cpu_threads: int = Field(
        0,
        ge=0,
        le=4096,
        description="Threads of the model's forwards (torch intra-op / OpenMP). 0: the CPUs the process "
        "may use (its affinity, capped by its cgroup CPU quota). See docs/cpu-performance.md.",
    )
    cpu_bind: str | None = Field(
        None,
        pattern=r"^(auto|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
        description="Pin the forward threads one per CPU: a list such as 0-7, or auto (the CPUs the "
        "process may use, in order). For exclusive cores (Guaranteed QoS with the static CPU manager). "
        "Default: not pinned.",
    )
    max_waiting: int = Field(256, ge=1, description="Queued requests before new ones get 429 (Retry-After).")
    redis_url: str | None = Field(
        None,
        description="Redis of the shared cold cache tier: redis://host:6379/0 (or rediss://, "
        "unix:///path), redis+sentinel://host:26379,host:26379/<master set>/0, or "
        "redis+cluster://host:6379,host:6379 (seed nodes). KV blocks and conversations are written "
        "behind and any replica can resume them. Default: no Redis.",
    )
    redis_ttl_s: int = Field(
        86_400, ge=1, description="Expiry of Redis cache entries in seconds, refreshed on every access."
    )
    restore_policy: Literal["cost", "always", "never"] = Field(
        "cost",
        description="Restore a cached prefix from the host tier / Redis or recompute it: cost (the "
        "cheaper, from bandwidths and prefill speed measured while serving), always, never.",
    )
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API key; repeatable. Each key is its own tenant. None: one anonymous tenant.",
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line ('#' starts a comment), added to --api-key."
    )
    max_request_bytes: ByteSize = Field(
        ByteSize(4 << 20), description="Largest request body accepted (413 above it), e.g. 4MiB."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "alora-serve",
        description="Where the offline demo model is built (used only without --model).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: longest wait for in-flight requests before exiting."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("adapter", mode="before")
    @classmethod
    def _parse_adapters(cls, value: Any) -> Any:
        """Accept NAME=PATH strings: a list from the CLI, a comma-separated string from the env."""
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        adapters: dict[str, str] = {}
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"adapter {item!r} must be NAME=PATH")
            if name.strip() in adapters:
                raise ValueError(f"adapter {name.strip()!r} is given twice")
            adapters[name.strip()] = path.strip()
        return adapters

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        """A malformed URL is refused here, before the model loads (no connection is made)."""
        if value:
            redis_url.parse(value)
        return value

    @field_validator("api_key", "served_model_name", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("served_model_name")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or len(name) > 256 or any(c.isspace() for c in name):
                raise ValueError(f"served model name {name!r} must be 1-256 characters without spaces")
        if len(set(value)) != len(value):
            raise ValueError(f"served model names {value} repeat a name")
        return value

    def api_keys(self) -> list[str]:
        """All accepted keys: --api-key values plus the lines of --api-keys-file."""
        keys = [k.get_secret_value() for k in self.api_key]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                key = line.split("#", 1)[0].strip()
                if key:
                    keys.append(key)
        return keys


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _metavar(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "{" + ",".join(str(a) for a in get_args(annotation)) + "}"
    if get_origin(annotation) in (Union, types.UnionType):
        return _metavar(next(a for a in get_args(annotation) if a is not type(None)))
    return getattr(annotation, "__name__", "VALUE").upper()


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per Settings field; unset flags leave env/defaults in force."""
    parser = argparse.ArgumentParser(
        prog="alora-serve",
        description="Serve a base causal LM plus LoRA / aLoRA intrinsics over HTTP. "
        f"Every flag can also be set with the {ENV_PREFIX}* variable named in its help.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    for name, info in Settings.model_fields.items():
        help_text = f"{info.description} [env {env_var(name)}]"
        if name in REPEATABLE:
            metavar = {"adapter": "NAME=PATH", "api_key": "KEY"}.get(name, "NAME")
            parser.add_argument(flag(name), dest=name, action="append", metavar=metavar, help=help_text)
        elif info.annotation is bool:  # a switch: present = true (the env var takes true / false)
            parser.add_argument(flag(name), dest=name, action="store_const", const=True, help=help_text)
        else:
            parser.add_argument(flag(name), dest=name, metavar=_metavar(info.annotation), help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags (argv) over ALORA_* env vars over defaults; exits 2 with a clear message."""
    parser = build_parser()
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}" for err in exc.errors()
        )
        parser.error(problems)
