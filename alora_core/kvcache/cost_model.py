"""Restore or recompute? Both costs from bandwidths measured while serving (moving averages).

    restore_s(t)   = host_bytes(t) / host_bw  +  [redis part] (redis_latency + redis_bytes(t) / redis_bw)
    recompute_s(n) = n * prefill_s_per_token
    choose the restore end t in {device end, host end, redis end} minimising
        restore_s(t) + recompute_s(want - t)

A short prefix in Redis costs more round trip than compute, so it is simply recomputed; on a fast GPU
a slow Redis loses to prefill even for long ones. The priors only matter until the first
measurements arrive.
"""

from dataclasses import dataclass
from typing import Literal

RestorePolicy = Literal["cost", "always", "never"]  # always / never: for tests and benchmarks


@dataclass
class CostModel:
    prefill_s_per_token: float = 2e-4
    host_bytes_per_s: float = 4e9
    redis_bytes_per_s: float = 1e9
    redis_latency_s: float = 1e-3
    learn: bool = True
    weight: float = 0.25  # of each new measurement in the moving average

    def _ema(self, old: float, new: float) -> float:
        return old + self.weight * (new - old)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if self.learn and tokens >= 32 and seconds > 0:  # prefill-dominated steps only
            self.prefill_s_per_token = self._ema(self.prefill_s_per_token, seconds / tokens)

    def observe_transfer(self, tier: Literal["host", "redis"], nbytes: int, seconds: float) -> None:
        if not self.learn or nbytes < 1 << 18 or seconds <= 0:  # small copies measure overheads
            return
        if tier == "host":
            self.host_bytes_per_s = self._ema(self.host_bytes_per_s, nbytes / seconds)
        else:
            transfer = max(seconds - self.redis_latency_s, seconds / 2)
            self.redis_bytes_per_s = self._ema(self.redis_bytes_per_s, nbytes / transfer)

    def observe_redis_latency(self, seconds: float) -> None:
        if self.learn and seconds > 0:
            self.redis_latency_s = self._ema(self.redis_latency_s, seconds)

    def restore_s(self, host_bytes: int, redis_bytes: int) -> float:
        cost = host_bytes / self.host_bytes_per_s
        if redis_bytes:
            cost += self.redis_latency_s + redis_bytes / self.redis_bytes_per_s
        return cost

    def recompute_s(self, tokens: int) -> float:
        return max(tokens, 0) * self.prefill_s_per_token
