"""The adapter bank's bookkeeping: the table plan against a plain loop, the plan shared by banks of
one layout, and selection-only banks that keep k-1 weights where the k-th is derived (lossless)."""

from __future__ import annotations

import pytest
import torch

from vblora.core.bank import AdapterBank, _table_plan, build_layout, derived_last

SHAPES = [("q", 32, 16), ("k", 16, 48), ("v", 64, 64), ("o", 8, 8)]


def reference_order(layout, rows):
    """Row order of the composed table, one row at a time: each module's B rows rank-major."""
    order = list(range(rows))
    for s in layout.values():
        blocks = s.out_features // s.vector_length
        for rank in range(s.r):
            for o in range(blocks):
                order[s.b_offset + rank * blocks + o] = s.b_offset + o * s.r + rank
    return order


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("spare", [0, 5])
def test_the_table_plan_equals_a_plain_loop(r, spare):
    layout = build_layout(SHAPES, r, 8)
    rows = max(s.end for s in layout.values()) + spare
    order, sizes, segment = _table_plan(layout, rows)
    want = reference_order(layout, rows)
    assert (list(range(rows)) if order is None else order.tolist()) == want
    assert sum(sizes) == rows and sizes[segment["q"]] == layout["q"].a_rows


def _bank(layout, h=6, k=2, seed=0):
    torch.manual_seed(seed)
    return AdapterBank(layout, h, 8, k)


def test_banks_of_one_layout_share_one_plan_and_others_do_not():
    layout = build_layout(SHAPES, 2, 8)
    a, b = _bank(layout), _bank(build_layout(SHAPES, 2, 8))  # equal, not the same dict
    c = _bank(build_layout(SHAPES[:2], 2, 8))
    assert a.layout is b.layout and a._order is b._order and a._sizes is b._sizes
    assert c.layout is not a.layout and c._sizes != a._sizes
    torch.testing.assert_close(a.compose()["v"][0], factor_a_alone(a, "v"))


def factor_a_alone(bank, path):
    """A of one module from its own rows, without the table plan."""
    s = bank.layout[path]
    return bank.subvectors(s.a_offset, s.b_offset).reshape(s.r, s.in_features)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_selection_from_a_file_keeps_k_minus_1_weights_losslessly(k):
    bank = _bank(build_layout(SHAPES, 2, 8), h=6, k=k)
    want = bank.compose()
    idx, w = bank.selection()
    partial = w[:, :-1].half().float()  # what a file holds: k-1 weights
    full = torch.cat([partial, derived_last(partial)], dim=-1)  # what a loader reads
    bank.keep_topk(idx, full)
    assert bank.topk_weights.shape == (bank.num_subvectors, k - 1)
    assert torch.equal(bank.selection()[1], full) and torch.equal(bank.selection()[0], idx)
    got = bank.compose()
    for path, (a, b) in want.items():
        torch.testing.assert_close(got[path][0], a, atol=2e-3, rtol=0)  # fp16 weights
        torch.testing.assert_close(got[path][1], b, atol=2e-3, rtol=0)


def test_a_selection_whose_last_weight_is_not_derived_keeps_all_k():
    bank = _bank(build_layout(SHAPES, 2, 8), h=6, k=3)
    idx, w = bank.selection()
    w = w.clone()
    w[0, -1] = torch.nextafter(w[0, -1], torch.tensor(2.0))  # one bit off 1 - sum: kept as given
    bank.keep_topk(idx, w)
    assert bank.topk_weights.shape == (bank.num_subvectors, 3)
    assert torch.equal(bank.selection()[1], w)


def test_casting_a_compact_selection_rounds_each_weight_once():
    bank = _bank(build_layout(SHAPES, 2, 8), h=6, k=2)
    idx, w = bank.selection()
    full = torch.cat([w[:, :1], derived_last(w[:, :1])], dim=-1)
    bank.keep_topk(idx, full)
    bank.to(torch.bfloat16)
    assert torch.equal(bank.selection()[1], full.bfloat16().float())
    bank.to(torch.float32)
    assert torch.equal(bank.selection()[1], full.bfloat16().float())


def test_state_dicts_load_across_the_two_widths():
    layout = build_layout(SHAPES, 2, 8)
    source = _bank(layout, seed=1)
    idx, w = source.selection()
    full = torch.cat([w[:, :1], derived_last(w[:, :1])], dim=-1)
    compact, wide = _bank(layout, seed=2), _bank(layout, seed=3)
    compact.keep_topk(idx, full)  # k-1 kept
    wide.keep_topk(idx, w)  # softmax weights: the k-th is not 1 - the rest bit for bit, all k kept
    assert compact.topk_weights.shape[-1] == 1 and wide.topk_weights.shape[-1] == 2
    for into, source_bank in ((wide, compact), (compact, wide)):
        into.load_state_dict(source_bank.state_dict())
        assert torch.equal(into.selection()[1], source_bank.selection()[1])
