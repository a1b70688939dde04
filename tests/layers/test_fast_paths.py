"""The performance paths of functional.py, bank.py and layer.py against plain references.

Each fast path must give the plain computation's numbers (to fp32 rounding): the blocked top-k on
wide tables, the rank-major composition with free B views, and the base matmul fused with the
adapter (forward and every gradient).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from vblora import VBLoRAConfig, get_vblora_model
from vblora.core import functional as VF
from vblora.core.bank import AdapterBank, build_layout
from vblora.layers.wrapper import VBLoRALayer


@pytest.mark.parametrize(("rows", "h", "k"), [(4096, 1024, 2), (2100, 2048, 3), (1500, 4096, 1)])
def test_blocked_topk_selects_what_topk_selects(rows: int, h: int, k: int) -> None:
    logits = torch.randn(rows, h, generator=torch.Generator().manual_seed(h), requires_grad=True)
    got_values, got_index = VF.select_topk(logits, k)
    want_values, want_index = logits.topk(k, dim=-1)
    assert got_index.equal(want_index) and got_values.equal(want_values)
    grad = torch.randn(rows, k)
    (got_grad,) = torch.autograd.grad(got_values, logits, grad)
    (want_grad,) = torch.autograd.grad(want_values, logits, grad)
    assert got_grad.equal(want_grad)


def test_blocked_topk_keeps_stored_topk_rows() -> None:
    """Rows of a top-k checkpoint: k finite log-weights, -inf elsewhere (some weights may be 0)."""
    logits = torch.full((2048, 2048), float("-inf"))
    logits[:, 7], logits[:, 1500] = -0.1, -2.3
    logits[:10, 1500] = float("-inf")  # a zero weight: log 0
    values, index = VF.select_topk(logits, 2)
    assert (index[:, 0] == 7).all() and (index[10:, 1] == 1500).all()
    assert torch.isinf(values[:10, 1]).all()


def test_composed_factors_equal_the_per_module_reference() -> None:
    """B is a free transposed view of rank-major rows; values equal PEFT-order factor_a/factor_b."""
    shapes = [("a", 8, 12), ("b", 12, 4), ("c", 4, 8)]
    torch.manual_seed(0)
    bank = AdapterBank(build_layout(shapes, 3, 4), 10, 4, 2, init_logits_std=1.0)
    factors = bank.compose()
    for path, s in bank.layout.items():
        sub = VF.topk_admixture(bank.logits[s.a_offset : s.end], bank.bank, 2)
        a, b = factors[path]
        torch.testing.assert_close(a, VF.factor_a(sub[: s.a_rows], s.r, s.in_features), rtol=0, atol=0)
        torch.testing.assert_close(b, VF.factor_b(sub[s.a_rows :], s.r, s.out_features), rtol=0, atol=0)
        assert b.T.is_contiguous()


def test_composition_gradients_equal_the_per_module_reference() -> None:
    shapes = [("a", 8, 12), ("b", 12, 4)]
    torch.manual_seed(0)
    bank = AdapterBank(build_layout(shapes, 2, 4), 10, 4, 2, init_logits_std=1.0)
    outs = [t for pair in bank.compose().values() for t in pair]
    grads = [torch.randn_like(t) for t in outs]
    got = torch.autograd.grad(outs, [bank.logits, bank.bank], grads)
    want_outs = []
    for s in bank.layout.values():
        sub = VF.topk_admixture(bank.logits[s.a_offset : s.end], bank.bank, 2)
        want_outs += [
            VF.factor_a(sub[: s.a_rows], s.r, s.in_features),
            VF.factor_b(sub[s.a_rows :], s.r, s.out_features),
        ]
    want = torch.autograd.grad(want_outs, [bank.logits, bank.bank], grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_adapter_matches_two_branches_and_gradchecks(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, weight, a, b_t = rand(2, 3, 8), rand(6, 8), rand(2, 8), rand(2, 6)
    bias = rand(6) if with_bias else None
    b = b_t.T  # a transposed view, as composed
    want = nn.functional.linear(x, weight, bias) + x @ a.T @ b.T
    torch.testing.assert_close(VF.linear_with_adapter(x, weight, bias, a, b), want)
    with torch.no_grad():
        torch.testing.assert_close(VF.linear_with_adapter(x, weight, bias, a, b), want)
    assert torch.autograd.gradcheck(VF.linear_with_adapter, (x, weight, bias, a, b))


def _train_once(builder, config: VBLoRAConfig, fused: bool, monkeypatch) -> tuple:
    torch.manual_seed(0)
    model = get_vblora_model(builder(), config)
    if not fused:
        monkeypatch.setattr(VBLoRALayer, "_fusable", lambda self, x, base: None)
    model.train()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return out.logits.detach(), grads


@pytest.mark.parametrize(
    ("builder", "targets", "bias"),
    [(tiny_llama, "all-linear", "none"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "all")],
)
def test_fused_layer_equals_unfused_layer(builder, targets, bias: str, monkeypatch) -> None:
    """nn.Linear and Conv1D, with trained biases: outputs and every gradient."""
    config = VBLoRAConfig(
        num_vectors=32,
        vector_length=16,
        target_modules=targets,
        bias=bias,
        init_vector_bank_bound=0.5,
        init_logits_std=1.0,
    )
    fused_out, fused_grads = _train_once(builder, config, True, monkeypatch)
    plain_out, plain_grads = _train_once(builder, config, False, monkeypatch)
    torch.testing.assert_close(fused_out, plain_out)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fusion_only_where_the_base_call_can_be_skipped() -> None:
    torch.manual_seed(0)
    model = get_vblora_model(tiny_llama(), VBLoRAConfig(num_vectors=32, vector_length=16))
    layer = next(model.vblora_layers())
    base = layer.base_layer
    x = torch.randn(2, 3, layer.in_features)
    assert layer._fusable(x, base) is not None
    assert layer._fusable(x.double(), base) is None  # one dtype only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable(x, base) is None
    with torch.no_grad():
        want = layer(x)
        # A hook on the base layer must see the base output: the layer then calls the base layer.
        seen: list[torch.Tensor] = []
        handle = base.register_forward_hook(lambda module, args, out: seen.append(out))
        torch.testing.assert_close(layer(x), want)
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], base.forward(x))
        model.merge_adapter()  # merged: the base's own output, hooks still called
        assert layer._fusable(x, base) is None
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
        assert len(seen) == 2
        handle.remove()
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
