"""QuantLinear and a whole model through the kernels (interpreted on CPU), against the reference path."""

from __future__ import annotations

import copy

import pytest
import torch

from rsavq_core.errors import ConfigError
from rsavq_core.runtime import QuantLinear, kernel_policy, quantize_in_place
from rsavq_core.settings import CoreSettings, load_settings
from tests.core.test_artifact import make_vq_layer, tiny_layers


@pytest.fixture
def kernels_on_cpu(rsavq_settings) -> None:
    rsavq_settings(kernels="interpret")


@pytest.mark.interpret
@pytest.mark.parametrize("tokens", [1, 3, 9])  # 1 and 3: fused GEMV; 9: dequantize + GEMM
def test_quantlinear_kernel_path_matches_reference(kernels_on_cpu: None, tokens: int) -> None:
    layer = make_vq_layer(45, 70, 6, 2, [3, 2, 1], bias=True, seed=2)
    x = torch.randn(2, tokens, 70)
    assert layer.bias is not None
    expected = torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias.float())
    qlin = QuantLinear(layer)
    y = qlin(x)
    assert y.shape == (2, tokens, 45)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert qlin._cache == {}, "the kernel path must not keep an expanded weight"
    # Indices and codebooks are held once: the group buffers are views of the kernels' streams.
    packed = qlin._packed()
    words, codebooks = qlin.get_buffer("g0_indices"), qlin.get_buffer("g2_codebooks")
    assert words.untyped_storage().data_ptr() == packed.words.untyped_storage().data_ptr()
    assert codebooks.untyped_storage().data_ptr() == packed.codebooks.untyped_storage().data_ptr()


@pytest.mark.interpret
def test_fallbacks_take_the_reference(kernels_on_cpu: None, rsavq_settings) -> None:
    layer = make_vq_layer(12, 20, 6, 2, [2, 1], seed=4)
    qlin = QuantLinear(layer)
    x64 = torch.randn(1, 20, dtype=torch.float64)
    assert not qlin._uses_kernels(x64)  # float64: not a kernel dtype
    torch.testing.assert_close(qlin(x64), x64 @ layer.dequantize(torch.float64).T)
    assert qlin._uses_kernels(x64.float())
    rsavq_settings(kernels="off")
    assert not qlin._uses_kernels(x64.float())
    with pytest.raises(ConfigError, match="RSAVQ_KERNELS"):
        rsavq_settings(kernels="sometimes")


def test_a_bad_policy_in_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSAVQ_KERNELS", "sometimes")
    with pytest.raises(ConfigError, match="RSAVQ_KERNELS"):
        load_settings(CoreSettings)


def test_default_policy_keeps_cpu_on_the_reference(rsavq_settings) -> None:
    rsavq_settings(kernels="auto")
    assert not kernel_policy().runs_on(torch.device("cpu"))
    qlin = QuantLinear(make_vq_layer(12, 20, 6, 2, [2, 1], seed=4))
    qlin(torch.randn(1, 20))
    assert qlin._kernel_layout is None and len(qlin._cache) == 1


@pytest.mark.interpret
def test_generate_through_kernels_matches_reference(
    tiny_llama,
    kernels_on_cpu: None,
    rsavq_settings,
) -> None:
    """Greedy decoding with the KV cache: prefill (dequantize + GEMM) then 1-token GEMV steps."""
    _generate_both_ways(tiny_llama, rsavq_settings, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_on_gpu_matches_reference(
    tiny_llama,
    rsavq_settings,
    dtype: torch.dtype,
) -> None:
    """Logits through the kernels match the reference (half precision: a tolerance, not tokens,
    since a random model's near-tied logits may flip an argmax); generate() runs greedy and sampled."""
    rsavq_settings(kernels="auto")
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model)
    quantize_in_place(model, tiny_layers(model))
    model.to("cuda", dtype)
    enc = tokenizer("The quick brown fox jumps", return_tensors="pt", add_special_tokens=False).to("cuda")
    with torch.inference_mode():
        via_kernels = model(**enc).logits.float()
        for sample in (False, True):
            out = model.generate(
                **enc, max_new_tokens=5, min_new_tokens=5, do_sample=sample, pad_token_id=tokenizer.eos_token_id
            )
            assert out.shape[1] == enc["input_ids"].shape[1] + 5
        rsavq_settings(kernels="off")
        via_reference = model(**enc).logits.float()
    torch.testing.assert_close(via_kernels, via_reference, rtol=2e-2, atol=2e-2)


def _generate_both_ways(
    tiny_llama,
    rsavq_settings,
    device: str,
    dtype: torch.dtype,
) -> None:
    """Greedy tokens through the kernels equal the reference path's (fp32: exact enough)."""
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model)
    layers = tiny_layers(model)  # VQ and scalar layers
    assert {layer.kind for layer in layers.values()} == {"vq", "scalar"}
    quantize_in_place(model, layers)
    model.to(device, dtype)
    enc = tokenizer("The quick brown fox", return_tensors="pt", add_special_tokens=False).to(device)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.inference_mode():
        via_kernels = model.generate(**enc, **kwargs)
        rsavq_settings(kernels="off")
        via_reference = model.generate(**enc, **kwargs)
    assert torch.equal(via_kernels, via_reference)
