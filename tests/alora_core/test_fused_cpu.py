"""Fused RMSNorm and SiLU-and-mul (model/fused_cpu.py) on every model family: what is swapped, and the
model's logits with the swap equal transformers' own forward of the same weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from alora_core.fixtures import DemoPaths
from alora_core.model import cpu_kernels, cpu_linear, fused_cpu
from alora_core.model.cpu_kernels import CpuKernels
from tests.alora_core.families import FAMILIES, sizes

# what each family's modules compute (transformers' definitions), so what must and must not be fused
NOT_PLAIN_RMSNORM = {"gemma2", "gemma3"}  # x * (1 + w)
NO_SILU_GATED_MLP = {"gemma2", "gemma3", "phi3", "gpt_oss", "granitemoehybrid"}  # GELU, fused gate_up, MoE


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    loaded = cpu_kernels.load()
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def tokenizer(demo: DemoPaths) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(demo.model))


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("fused_linears", [False, True])
def test_fused_modules_keep_the_models_logits(
    name: str, fused_linears: bool, kernels: CpuKernels, tokenizer: PreTrainedTokenizerBase
) -> None:
    torch.manual_seed(0)
    config = FAMILIES[name].config(sizes(tokenizer))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 400, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    if fused_linears:  # with q/k/v and gate/up as one GEMM each (their outputs are column views)
        cpu_linear.calibrate(model, timer=lambda fn: 1.0)

    swapped = fused_cpu.install(model, kernels)

    kinds = {type(m).__name__ for m in model.modules()}
    fused_norms = any(k.startswith("Fused") and k.endswith("RMSNorm") for k in kinds)
    fused_mlps = any(k.startswith("Fused") and k.endswith("MLP") for k in kinds)
    assert fused_norms == (name not in NOT_PLAIN_RMSNORM), kinds
    assert fused_mlps == (name not in NO_SILU_GATED_MLP), kinds
    assert swapped == sum(type(m).__name__.startswith("Fused") for m in model.modules())
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_other_dtypes_take_the_modules_own_forward(
    kernels: CpuKernels, tokenizer: PreTrainedTokenizerBase
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"].config(sizes(tokenizer))).eval()
    fused_cpu.install(model, kernels)
    norm = model.model.norm
    assert type(norm).__name__ == "FusedLlamaRMSNorm"
    x = torch.randn(2, 64, dtype=torch.float64)
    with torch.inference_mode():
        y = norm(x)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected)


def test_kernels_against_their_definitions(kernels: CpuKernels) -> None:
    """The kernels on strided rows (column views of a wider GEMM output, as the fused MLP gets them)."""
    gen = torch.Generator().manual_seed(2)
    both = torch.randn(37, 2 * 48, generator=gen) * 4
    gate, up = both[:, :48], both[:, 48:]
    torch.testing.assert_close(
        kernels.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6
    )
    x, w = torch.randn(37, 96, generator=gen)[:, :32] * 3, torch.randn(32, generator=gen)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), expected, rtol=1e-6, atol=1e-6)
