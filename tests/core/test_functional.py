"""The math against a plain-loop reference of the paper's formula (and PEFT's, when installed)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vblora.core import functional as VF


def reference_subvector(z: list[float], bank: torch.Tensor, k: int) -> torch.Tensor:
    """s = sum_{i in topk(z)} softmax(z_topk)_i V[i], written as plain Python loops."""
    order = sorted(range(len(z)), key=lambda i: -z[i])[:k]
    top = [z[i] for i in order]
    m = max(top)
    exps = [math.exp(t - m) for t in top]
    total = sum(exps)
    out = [0.0] * bank.shape[1]
    for e, i in zip(exps, order):
        for j in range(bank.shape[1]):
            out[j] += e / total * float(bank[i, j])
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    h=st.integers(2, 12),
    b=st.integers(1, 5),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_topk_admixture_matches_plain_loop(rows: int, h: int, b: int, k: int, seed: int) -> None:
    k = min(k, h)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, h, generator=g, dtype=torch.float64)
    bank = torch.rand(h, b, generator=g, dtype=torch.float64) - 0.5
    got = VF.topk_admixture(logits, bank, k)
    want = torch.stack([reference_subvector(logits[p].tolist(), bank, k) for p in range(rows)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_factor_layouts_follow_peft_order() -> None:
    r, b, n_in, n_out = 3, 2, 4, 6
    sub_a = torch.arange(r * n_in // b * b, dtype=torch.float64).reshape(-1, b)
    a = VF.factor_a(sub_a, r, n_in)
    # A[i, j*b:(j+1)*b] is sub-vector (i, j): rows are r-major over in/b tiles.
    for i in range(r):
        for j in range(n_in // b):
            torch.testing.assert_close(a[i, j * b : (j + 1) * b], sub_a[i * (n_in // b) + j])
    sub_b = torch.arange(n_out // b * r * b, dtype=torch.float64).reshape(-1, b)
    bm = VF.factor_b(sub_b, r, n_out)
    assert bm.shape == (n_out, r)
    # B[o*b + l, i] = sub-vector (o, i)[l]: rows are tile-major over r.
    for o in range(n_out // b):
        for i in range(r):
            for l_ in range(b):
                assert bm[o * b + l_, i] == sub_b[o * r + i, l_]


def test_delta_weight_and_adapter_delta_agree() -> None:
    g = torch.Generator().manual_seed(0)
    a, bm, x = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), torch.randn(3, 6, generator=g)
    delta = VF.delta_weight(a, bm)
    torch.testing.assert_close(VF.adapter_delta(x, a, bm), x @ delta.T)
    torch.testing.assert_close(VF.delta_weight(a, bm, fan_in_fan_out=True), delta.T)


def test_gradient_reaches_exactly_the_selected_logits_and_whole_bank() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 9, generator=g, requires_grad=True)
    bank = torch.randn(9, 4, generator=g, requires_grad=True)
    out = VF.topk_admixture(logits, bank, 3)
    (out * torch.randn_like(out)).sum().backward()
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(3, -1).indices, True)
    assert (logits.grad[~selected] == 0).all()
    assert (logits.grad[selected] != 0).all()
    used = selected.any(0)
    assert (bank.grad[used].abs().sum(-1) > 0).all()
    assert (bank.grad[~used] == 0).all()


def test_topk_round_trip_through_dense_logits_is_exact() -> None:
    g = torch.Generator().manual_seed(3)
    logits, bank = torch.randn(11, 16, generator=g), torch.randn(16, 8, generator=g)
    indices, weights = VF.topk_compress(logits, 2)
    dense = VF.logits_from_topk(indices, weights, 16)
    torch.testing.assert_close(VF.topk_admixture(dense, bank, 2), VF.topk_admixture(logits, bank, 2))
    torch.testing.assert_close(
        VF.admixture_from_topk(indices, weights, bank), VF.topk_admixture(logits, bank, 2)
    )


def test_matches_peft_low_rank_matrices() -> None:
    peft_layer = pytest.importorskip("peft.tuners.vblora.layer")
    g = torch.Generator().manual_seed(0)
    r, n_in, n_out, b, h, k = 2, 8, 12, 4, 10, 2
    bank = torch.randn(h, b, generator=g)
    logits_a = torch.randn(r, n_in // b, h, generator=g)
    logits_b = torch.randn(n_out // b, r, h, generator=g)
    # PEFT's math, called on its own layer implementation with our tensors.
    get = peft_layer.Linear._get_low_rank_matrix
    want_a = get(None, logits_a, bank, k).reshape(r, -1)
    want_b = get(None, logits_b, bank, k).transpose(1, 2).reshape(-1, r)
    got_a = VF.factor_a(VF.topk_admixture(logits_a.reshape(-1, h), bank, k), r, n_in)
    got_b = VF.factor_b(VF.topk_admixture(logits_b.reshape(-1, h), bank, k), r, n_out)
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_b, want_b)
