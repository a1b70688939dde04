"""The one top-k selection rule (``functional.select_topk``), ties included, against a plain reference.

The rule: the k largest logits of a row, ties broken by the lowest index, in descending order of
value (equal values by ascending index). The reference is a stable descending sort. ``torch.topk``
leaves ties unspecified, which is what let a reloaded adapter pick other bank vectors (issue 15).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vblora.core import functional as VF


def reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def tables(rows: int, h: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":  # zero init: every entry ties
        return torch.zeros(rows, h)
    if kind == "few-values":  # many ties everywhere
        return torch.randint(0, 3, (rows, h), generator=g).float()
    if kind == "bf16":  # a bf16-cast model at default init (std 0.1): ties at the cut
        return (torch.randn(rows, h, generator=g) * 0.1).bfloat16().float()
    if kind == "top-tie":  # two equal maxima per row, far apart
        x = torch.randn(rows, h, generator=g)
        x[:, h - 1] = x[:, 3] = x.max(dim=-1).values + 1
        return x
    return torch.randn(rows, h, generator=g)


@pytest.mark.parametrize("kind", ["zeros", "few-values", "bf16", "top-tie", "random"])
@pytest.mark.parametrize(("rows", "h", "k"), [(2100, 2048, 2), (4096, 1024, 3), (33, 96, 2), (5, 7, 7)])
def test_selection_follows_the_rule_on_the_fast_and_the_plain_path(kind, rows, h, k):
    # (2100, 2048) and (4096, 1024) take the blocked CPU path, the others torch.topk
    logits = tables(rows, h, kind)
    values, indices = VF.select_topk(logits, k)
    want = reference(logits, k)
    assert indices.equal(want)
    assert values.equal(logits.gather(-1, want))


def test_torch_topk_alone_breaks_ties_otherwise():
    """Why the rule exists: topk's choice among equal logits is not the lowest index."""
    logits = torch.zeros(3, 16)
    assert not logits.topk(3, dim=-1).indices.equal(reference(logits, 3))
    assert VF.select_topk(logits, 3)[1].equal(reference(logits, 3))


def test_every_selection_path_agrees_on_tied_logits():
    """Composition, topk_compress (savers, compact files) and subvectors (export) select alike."""
    logits = tables(2100, 2048, "bf16")
    bank = torch.randn(2048, 4)
    indices, weights = VF.topk_compress(logits, 2)
    assert indices.equal(reference(logits, 2))
    composed = VF.topk_admixture(logits, bank, 2)
    stored = VF.admixture_from_topk(indices, weights, bank)
    torch.testing.assert_close(composed, stored, rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_selected_logits_only():
    logits = tables(64, 32, "few-values").requires_grad_(True)
    values, _ = VF.select_topk(logits, 2)
    values.sum().backward()
    want = torch.zeros(64, 32).scatter(-1, reference(logits.detach(), 2), 1.0)
    assert logits.grad.equal(want)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.data(),
)
def test_selection_property_on_small_tables_with_ties(rows, h, data):
    k = data.draw(st.integers(1, h))
    cells = data.draw(
        st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("-inf")]), min_size=rows * h, max_size=rows * h)
    )
    logits = torch.tensor(cells).reshape(rows, h)
    assert VF.select_topk(logits, k)[1].equal(reference(logits, k))


@pytest.mark.parametrize("kind", ["zeros", "few-values", "bf16", "random"])
def test_the_sync_free_tie_resolution_of_accelerators_follows_the_rule(kind):
    """The branch-free variant other devices use (no host sync), run on CPU."""
    logits = tables(300, 96, kind)
    values, indices = logits.topk(3, dim=-1)
    following = logits.topk(4, dim=-1).values[:, 3]
    for branch in (True, False):
        got = VF._resolve_ties(logits, values[:, :2], indices[:, :2], values[:, 2], branch=branch)
        assert got.equal(reference(logits, 2))
        got = VF._resolve_ties(logits, values, indices, following, branch=branch)
        assert got.equal(reference(logits, 3))
