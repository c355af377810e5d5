"""alora-serve core: a base causal LM plus LoRA / Activated-LoRA adapters on paged, reusable KV caches."""

from alora_core.engine import Engine, EngineConfig, GenerationResult
from alora_core.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationResult", "SamplingParams"]
