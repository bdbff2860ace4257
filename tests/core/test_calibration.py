"""Calibration statistics against a direct autograd computation, and the on-disk statistics cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rsavq_core.calibration import cache as stats_cache
from rsavq_core.calibration.cache import StatsKey, StatsStore, compute_statistics
from rsavq_core.calibration.statistics import (
    LayerStats,
    block_statistics,
    record_block_inputs,
    sink_protected_hessian,
)
from rsavq_core.data.windows import tokens_hash
from rsavq_core.errors import CalibrationError
from rsavq_core.models.layout import find_decoder_layout, quantizable_linears

S, T = 3, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens(tiny_llama: Any) -> torch.Tensor:
    model, _ = tiny_llama
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (S, T), generator=gen)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """assert_close with an absolute floor relative to the tensor's scale (entries can be ~0)."""
    expected = expected.to(actual.dtype)
    atol = rtol * float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def sequence_loss(model: Any, seq: torch.Tensor) -> torch.Tensor:
    """ℓ_s: mean next-token cross-entropy of one sequence [T]."""
    logits = model(input_ids=seq[None], use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1].float(), seq[1:])


@pytest.fixture(scope="module")
def reference(tiny_llama: Any, tokens: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per linear: Ḡ, F_O, F_I, τ from per-sequence autograd, H from forward hooks, and the K-FAC δδᵀ."""
    model, _ = tiny_llama
    linears = dict(quantizable_linears(model))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    weights = [m.weight for m in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    deltas: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: Any, args: tuple, output: torch.Tensor) -> None:
            xs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            output.retain_grad()
            outs[name] = output

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for s in range(S):
            outs.clear()
            loss = sequence_loss(model, tokens[s])
            loss.backward()
            for name, mod in linears.items():
                weight_grad, output_grad = mod.weight.grad, outs[name].grad
                assert weight_grad is not None and output_grad is not None
                grads[name].append(weight_grad.detach().clone())
                deltas[name].append(output_grad.detach().reshape(-1, mod.out_features))
                mod.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    out: dict[str, dict[str, Any]] = {}
    for name in linears:
        g = torch.stack(grads[name]).double()  # [S, M, N]
        x = torch.cat(xs[name]).double()  # [S·T, N]
        d = torch.cat(deltas[name]).double()  # [S·T, M]
        out[name] = {
            "grad_mean": g.mean(0),
            "fisher_out": torch.einsum("smn,skn->mk", g, g) / S,
            "fisher_in": torch.einsum("smn,smk->nk", g, g) / S,
            "tau": float((g * g).sum() / S),
            "hessian": x.T @ x / x.shape[0],
            # each sequence's first token: the attention sink
            "hessian_first": x[::T].T @ x[::T] / S,
            "kfac_out": T * (d.T @ d) / d.shape[0],
            # sanity of the reference itself: G_s = δ_sᵀ X_s
            "g_from_delta": torch.stack([d[s * T : (s + 1) * T].T @ x[s * T : (s + 1) * T] for s in range(S)]).mean(0),
        }
    return out


def run_statistics(
    model: Any, tokens: torch.Tensor, fisher: str, micro_batch: int, want_grads: bool = True
) -> dict[str, LayerStats]:
    layout = find_decoder_layout(model)
    inputs, kwargs, grads = record_block_inputs(model, tokens, micro_batch=micro_batch, want_grads=want_grads)
    stats: dict[str, LayerStats] = {}
    for index in reversed(range(len(layout.blocks))):
        block_stats, grads = block_statistics(
            layout.blocks[index], inputs[index], kwargs[index], grads, fisher=fisher, seq_len=tokens.shape[1]
        )
        for name, st in block_stats.items():
            stats[f"{layout.blocks_path}.{index}.{name}"] = st
    return stats


def test_reference_is_consistent(reference: dict[str, dict[str, Any]]) -> None:
    for ref in reference.values():
        close(ref["g_from_delta"], ref["grad_mean"], rtol=1e-4)
        assert ref["tau"] == pytest.approx(float(ref["fisher_out"].trace()), rel=1e-9)
        assert ref["tau"] == pytest.approx(float(ref["fisher_in"].trace()), rel=1e-9)


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_exact_fisher_matches_autograd(
    tiny_llama: Any, tokens: torch.Tensor, reference: dict[str, dict[str, Any]], micro_batch: int
) -> None:
    model, _ = tiny_llama
    stats = run_statistics(model, tokens, "exact", micro_batch)
    assert set(stats) == set(reference)
    for name, st in stats.items():
        ref = reference[name]
        assert st.n_samples == S and st.n_tokens == S * T
        assert float(ref["grad_mean"].abs().max()) > 0
        for key in ("grad_mean", "fisher_out", "fisher_in", "hessian"):
            value = getattr(st, key)
            assert value.dtype == torch.float32
            close(value, ref[key])
        assert st.tau == pytest.approx(ref["tau"], rel=1e-4)
    # no weight gradients were left behind, and the frozen flags were restored
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_micro_batch_does_not_change_statistics(tiny_llama: Any, tokens: torch.Tensor) -> None:
    model, _ = tiny_llama
    one, three = run_statistics(model, tokens, "exact", 1), run_statistics(model, tokens, "exact", 3)
    two = run_statistics(model, tokens, "exact", 2)  # uneven split: batches of 2 and 1
    for name in one:
        for other in (three, two):
            for key in ("grad_mean", "fisher_out", "fisher_in", "hessian"):
                close(getattr(other[name], key), getattr(one[name], key), rtol=1e-5)
            assert other[name].tau == pytest.approx(one[name].tau, rel=1e-5)


def test_kfac_fisher(tiny_llama: Any, tokens: torch.Tensor, reference: dict[str, dict[str, Any]]) -> None:
    model, _ = tiny_llama
    stats = run_statistics(model, tokens, "kfac", 2)
    for name, st in stats.items():
        ref = reference[name]
        assert st.tau == 1.0
        assert st.grad_mean is not None and st.fisher_out is not None
        assert st.fisher_in is not None and st.hessian is not None
        assert torch.equal(st.fisher_in, st.hessian)
        close(st.hessian, ref["hessian"])
        close(st.fisher_out, ref["kfac_out"])
        close(st.grad_mean, ref["grad_mean"])  # the mean gradient does not depend on the Fisher form


def test_hessian_only(tiny_llama: Any, tokens: torch.Tensor, reference: dict[str, dict[str, Any]]) -> None:
    model, _ = tiny_llama
    stats = run_statistics(model, tokens, "exact", 2, want_grads=False)
    for name, st in stats.items():
        assert st.grad_mean is None and st.fisher_out is None and st.fisher_in is None
        assert st.hessian is not None and st.hessian_first is not None
        close(st.hessian, reference[name]["hessian"])
        close(st.hessian_first, reference[name]["hessian_first"])


def test_sink_protection_gives_the_first_tokens_a_share_of_the_trace(tiny_llama: Any, tokens: torch.Tensor) -> None:
    """H + c E[x₀x₀ᵀ]: the first tokens' part of the trace (tr(H₀)/T in H, plus c tr(H₀)) reaches the
    asked share; a share they already have changes nothing; 0 leaves H as it is."""
    model, _ = tiny_llama
    stats = run_statistics(model, tokens, "exact", 2, want_grads=False)
    st = stats["model.layers.1.self_attn.v_proj"]
    assert sink_protected_hessian(st, 0.0) is st.hessian
    assert st.hessian is not None and st.hessian_first is not None

    def first_share(h: torch.Tensor) -> float:
        assert st.hessian is not None and st.hessian_first is not None
        first = float(st.hessian_first.double().trace())
        extra = float((h - st.hessian).double().trace())  # c tr(H₀)
        return (first / T + extra) / float(h.double().trace())

    had = first_share(st.hessian)
    assert 0 < had < 0.3
    assert first_share(sink_protected_hessian(st, 0.3)) == pytest.approx(0.3, rel=1e-4)
    assert torch.equal(sink_protected_hessian(st, had / 2), st.hessian)  # already above: unchanged
    with pytest.raises(CalibrationError, match="first-token"):
        sink_protected_hessian(dataclasses.replace(st, hessian_first=None), 0.1)


@pytest.mark.parametrize("fisher", ["exact", "kfac"])  # K-FAC's F_I *is* the Hessian: one storage, saved twice
def test_store_round_trip_and_reuse(
    tiny_llama: Any, tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fisher: str
) -> None:
    model, _ = tiny_llama
    key = StatsKey(
        fingerprint="tiny", tokens_hash=tokens_hash(tokens), n_samples=S, seq_len=T, fisher=fisher, with_grads=True
    )
    assert StatsStore.find(key, root=tmp_path) is None
    store = compute_statistics(model, tokens, key, micro_batch=2, root=tmp_path)
    assert store.complete() and store.folder.parent == tmp_path
    direct = run_statistics(model, tokens, fisher, 2)
    for index in range(2):
        loaded = store.load_block(index)
        assert set(loaded) == set(find_decoder_layout(model).linear_names(index))
        for name, st in loaded.items():
            ref = direct[f"model.layers.{index}.{name}"]
            for field in ("grad_mean", "fisher_out", "fisher_in", "hessian", "hessian_first"):
                torch.testing.assert_close(getattr(st, field), getattr(ref, field), rtol=1e-6, atol=0)
            assert st.tau == pytest.approx(ref.tau, rel=1e-12)
            assert (st.n_samples, st.n_tokens) == (S, S * T)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("statistics were recomputed although a complete store exists")

    monkeypatch.setattr(stats_cache, "record_block_inputs", boom)
    again = compute_statistics(model, tokens, key, root=tmp_path)
    assert again.folder == store.folder
    # A Hessian-only request is served by the store with gradients (any Fisher form).
    for form in ("exact", "kfac"):
        hess_key = StatsKey(**{**key.__dict__, "with_grads": False, "fisher": form})
        found = StatsStore.find(hess_key, root=tmp_path)
        assert found is not None and found.folder == store.folder
        assert compute_statistics(model, tokens, hess_key, root=tmp_path).folder == store.folder
    # ... but a different key is not.
    other = "exact" if fisher == "kfac" else "kfac"
    changes = ({"n_samples": S + 1}, {"fisher": other}, {"tokens_hash": "other"}, {"fingerprint": "x"})
    for change in (*changes, {"compute_dtype": "bfloat16"}):
        assert StatsStore.find(StatsKey(**{**key.__dict__, **change}), root=tmp_path) is None


def test_a_bf16_forward_gives_float32_statistics_near_the_float32_ones(
    tiny_llama: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    model, _ = tiny_llama
    key = StatsKey(
        fingerprint="tiny", tokens_hash=tokens_hash(tokens), n_samples=S, seq_len=T, fisher="exact", with_grads=True
    )
    exact = compute_statistics(model, tokens, key, micro_batch=2, root=tmp_path)
    half = compute_statistics(model, tokens, StatsKey(**{**key.__dict__, "compute_dtype": "bfloat16"}), root=tmp_path)
    assert half.folder != exact.folder
    for index in range(2):
        ours, reference = half.load_block(index), exact.load_block(index)
        for name, st in ours.items():
            for field in ("grad_mean", "fisher_in", "hessian"):
                got, want = getattr(st, field), getattr(reference[name], field)
                assert got.dtype == torch.float32  # the accumulators stay in float32
                error = float((got - want).norm() / want.norm())
                assert error < 0.05, (index, name, field, error)  # bf16 matmuls: about 1e-2
                if index == 1 or field != "hessian":
                    assert error > 0  # the forward really ran in bf16 (block 0's inputs are the embeddings)


def test_incomplete_store_is_not_used(tiny_llama: Any, tokens: torch.Tensor, tmp_path: Path) -> None:
    model, _ = tiny_llama
    key = StatsKey(
        fingerprint="tiny", tokens_hash=tokens_hash(tokens), n_samples=S, seq_len=T, fisher="exact", with_grads=False
    )
    store = compute_statistics(model, tokens, key, root=tmp_path)
    (store.folder / "meta.json").unlink()
    assert StatsStore.find(key, root=tmp_path) is None
    assert not store.complete()


def test_flattened_tokens_are_read_as_windows_and_routed_tokens_are_refused() -> None:
    """OPT's MLP runs on [B·T, N]: the statistics see it as [B, T, N], the same rows in the same
    order. A linear that saw only some of the tokens (a routed expert) is named in the error."""
    from rsavq_core.calibration.block_io import as_windows

    windows = torch.Size([3, 5])
    x = torch.randn(3, 5, 8)
    assert torch.equal(as_windows(x.reshape(15, 8), windows, "fc1"), x)
    assert as_windows(x, windows, "fc1") is x
    with pytest.raises(CalibrationError, match=r"'mlp.experts.0.w1'.*\[7, 8\]"):
        as_windows(torch.randn(7, 8), windows, "mlp.experts.0.w1")
