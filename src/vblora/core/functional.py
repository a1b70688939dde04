"""The math of VB-LoRA as pure functions over tensors.

Notation: h = num_vectors, b = vector_length, k = topk, r = rank, P = number of sub-vectors.
A sub-vector is the top-k admixture of bank vectors: ``s = sum_{i in topk(z)} softmax(z_topk)_i V[i]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_admixture(logits: Tensor, bank: Tensor, k: int, order: Tensor | None = None) -> Tensor:
    """Compose every sub-vector from the bank.

    Args:
        logits: (P, h) logits, one row per sub-vector.
        bank: (h, b) vector bank.
        k: number of bank vectors mixed per sub-vector.
        order: optional (P,) row permutation of the result: row i is the sub-vector of logits row
            ``order[i]``. It permutes the (P, k) selection, not the (P, h) logits, so it is nearly free.

    Returns:
        (P, b) sub-vectors in the dtype of ``bank``.
    """
    values, indices = _topk(logits, k)  # (P, k)
    if order is not None:
        values, indices = values[order], indices[order]
    weights = values.softmax(dim=-1).to(bank.dtype)  # softmax over the k selected logits only
    # embedding_bag sums the k weighted rows without materialising a (P, k, b) gather.
    return F.embedding_bag(indices, bank, per_sample_weights=weights, mode="sum")


def _topk(logits: Tensor, k: int, width: int = 128) -> tuple[Tensor, Tensor]:
    """``logits.topk(k, dim=-1)``: the same entries and values, faster for wide tables on CPU.

    The columns fall into h/width strided groups ``{j, j + width, ...}``. A row's k largest entries
    lie in the k groups with the largest maxima, and an element-wise max over the groups vectorises,
    so each row is narrowed to k * h/width candidates before the exact top-k (2-3x faster than
    ``topk`` at h = 2048 on CPU). Other shapes and devices use ``topk`` itself.
    """
    rows, h = logits.shape
    if logits.device.type != "cpu" or h % width or h < 8 * width or k > 16 or rows * h < 2**22:
        return logits.topk(k, dim=-1)
    groups = h // width
    with torch.no_grad():
        group_max = logits.reshape(rows, groups, width).amax(1)  # (P, width): max of j, j + width, ...
        offsets = width * torch.arange(groups, device=logits.device)
        candidates = (group_max.topk(k, dim=-1).indices.unsqueeze(-1) + offsets).flatten(1)  # (P, k*groups)
        indices = candidates.gather(-1, logits.gather(-1, candidates).topk(k, dim=-1).indices)
    return logits.gather(-1, indices), indices  # sorted by value, like topk


def admixture_from_topk(indices: Tensor, weights: Tensor, bank: Tensor) -> Tensor:
    """Sub-vectors from stored top-k indices (P, k) and their k softmax weights (P, k)."""
    return F.embedding_bag(indices.long(), bank, per_sample_weights=weights.to(bank.dtype), mode="sum")


def factor_a(sub: Tensor, r: int, in_features: int) -> Tensor:
    """A (r, in) from its r * in/b sub-vectors, PEFT's ``(r, in/b, b)`` order."""
    return sub.reshape(r, in_features)


def factor_b(sub: Tensor, r: int, out_features: int) -> Tensor:
    """B (out, r) from its out/b * r sub-vectors, PEFT's ``(out/b, r, b)`` order."""
    b = sub.shape[-1]
    # (out/b * r, b) -> (out/b, r, b) -> (out/b, b, r) -> (out, r)
    return sub.reshape(out_features // b, r, b).transpose(1, 2).reshape(out_features, r)


def factor_b_t(sub: Tensor, r: int, out_features: int) -> Tensor:
    """B (out, r) as a transposed view, from its sub-vectors in rank-major ``(r, out/b, b)`` order.

    The same B as :func:`factor_b` (whose rows are in PEFT's ``(out/b, r, b)`` order) without the
    transpose copy: ``F.linear`` reads the transposed view directly.
    """
    return sub.reshape(r, out_features).T


def delta_weight(a: Tensor, b: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """The weight update B @ A: (out, in), or (in, out) for fan-in/fan-out layers like Conv1D."""
    delta = b @ a
    return delta.T if fan_in_fan_out else delta


def adapter_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The adapter branch ``B (A x)`` applied to the last axis of x (dropout is the caller's)."""
    return F.linear(F.linear(x, a), b)


def linear_with_adapter(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``F.linear(x, weight, bias) + B (A x)`` with the adapter fused into the base matmul.

    Same math as the two separate branches, less memory traffic: B (A x) is accumulated into the
    base output by the matmul itself (no (N, out) temporary and no add), and in backward the
    adapter's input gradient is accumulated into the base's the same way. weight: (out, in).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, a, b)):
        return _LinearWithAdapter.apply(x, weight, bias, a, b)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
    return y.addmm_(x2 @ a.T, b.T).view(*x.shape[:-1], -1)


class _LinearWithAdapter(torch.autograd.Function):
    """Autograd of :func:`linear_with_adapter`; gradients only for the inputs that need them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2 @ a.T  # (N, r)
        y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        y.addmm_(h, b.T)  # (N, out)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = g @ b if need_x or need_a else None  # (N, r)
        gx = (g @ weight).addmm_(gh, a).view(ctx.x_shape) if need_x else None
        gw = g.T @ x2 if need_w else None
        gbias = g.sum(0) if need_bias else None
        ga = gh.T @ x2 if need_a else None
        gb = g.T @ h if need_b else None
        return gx, gw, gbias, ga, gb


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k selected indices (P, k) and their softmax weights (P, k) of each row of ``logits``."""
    values, indices = logits.topk(k, dim=-1)
    return indices, values.float().softmax(dim=-1)


def logits_from_topk(indices: Tensor, weights: Tensor, num_vectors: int) -> Tensor:
    """Dense logits whose top-k admixture equals the stored one: log-weights, -inf elsewhere.

    ``softmax(log w) = w`` when the weights sum to one, and -inf rows are never selected, so
    composing these logits reproduces the stored sub-vectors exactly.
    """
    dense = torch.full((*indices.shape[:-1], num_vectors), float("-inf"), dtype=torch.float32)
    return dense.scatter(-1, indices.long(), weights.float().log())
