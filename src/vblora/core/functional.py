"""The math of VB-LoRA as pure functions over tensors.

Notation: h = num_vectors, b = vector_length, k = topk, r = rank, P = number of sub-vectors.
A sub-vector is the top-k admixture of bank vectors: ``s = sum_{i in topk(z)} softmax(z_topk)_i V[i]``.
"""

from __future__ import annotations

from collections.abc import Callable
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
    values, indices = select_topk(logits, k)  # (P, k)
    if order is not None:
        values, indices = values[order], indices[order]
    weights = values.softmax(dim=-1).to(bank.dtype)  # softmax over the k selected logits only
    # embedding_bag sums the k weighted rows without materialising a (P, k, b) gather.
    return F.embedding_bag(indices, bank, per_sample_weights=weights, mode="sum")


def select_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The one selection rule of the package: the k largest logits of each row of (P, h) ``logits``.

    Ties are broken by the lowest index, and the k entries come in descending order of value
    (equal values by ascending index): exactly ``logits.sort(dim=-1, descending=True, stable=True)``
    cut to k, on every device and path. ``torch.topk`` leaves ties unspecified (on CPU,
    ``zeros(16).topk(3)`` picks 10, 11, 12), so composition, saving, compact files, export and
    ``inspect`` all select through here, and a reloaded adapter picks the vectors that were saved.

    Returns:
        values (P, k), differentiable with respect to ``logits``, and indices (P, k), int64.
    """
    h = logits.shape[-1]
    with torch.no_grad():
        flat = logits.detach().reshape(-1, h)
        if k >= h:
            indices = flat.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        else:
            indices = _resolve_ties(flat, *_largest(flat, k))
    indices = indices.reshape(*logits.shape[:-1], indices.shape[-1])
    return logits.gather(-1, indices), indices


def _resolve_ties(
    flat: Tensor, values: Tensor, indices: Tensor, following: Tensor, branch: bool | None = None
) -> Tensor:
    """The rule's k indices from the k largest entries (exact values, ties in any order) and the
    (k+1)-th value.

    Where the k-th and (k+1)-th values differ the selected set is already the rule's; elsewhere a
    tie crosses the cut, and the lowest tied indices are found over the whole row. On CPU only the
    tied rows are redone (a branch costs nothing there); on other devices every row, without a
    host sync (one more top-k), as under ``torch.compile``. ``branch`` forces either way.
    """
    k = values.shape[-1]
    kth = values[:, -1]
    tied = kth == following
    chosen = indices
    if branch is None:  # compiled graphs take the branch-free way too (no data-dependent branch)
        branch = flat.device.type == "cpu" and not torch.compiler.is_compiling()
    if branch:
        if tied.any():
            rows = tied.nonzero().squeeze(1)
            chosen = chosen.clone()
            chosen[rows] = _lowest_ties(flat[rows], kth[rows], k)
    else:
        chosen = torch.where(tied[:, None], _lowest_ties(flat, kth, k), chosen)
    # canonical order: by index, then (stable) by descending value
    chosen = chosen.sort(dim=-1).values
    by_value = flat.gather(-1, chosen).sort(dim=-1, descending=True, stable=True).indices
    return chosen.gather(-1, by_value)


def _lowest_ties(rows: Tensor, kth: Tensor, k: int) -> Tensor:
    """Every entry above the k-th value, then the lowest-indexed entries equal to it: (n, k)."""
    h = rows.shape[-1]
    position = torch.arange(h, 0, -1, device=rows.device)  # h - index: lower index, higher score
    above, equal = rows > kth[:, None], rows == kth[:, None]
    score = torch.where(above, 2 * h, torch.where(equal, position, -1))
    return score.topk(k, dim=-1).indices


def _largest(logits: Tensor, k: int, width: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest values of each row and their indices (ties in any order), and the (k+1)-th
    largest value; faster than ``topk`` for wide tables on CPU.

    The columns fall into h/width strided groups ``{j, j + width, ...}``. A row's k largest entries
    lie in the k groups with the largest maxima, and an element-wise max over the groups vectorises,
    so each row is narrowed to k * h/width candidates before the exact top-k (2-3x faster than
    ``topk`` at h = 2048 on CPU). The (k+1)-th value is the larger of the candidates' (k+1)-th and
    the (k+1)-th group maximum. Values are exact; which of several equal entries is returned is
    not (:func:`select_topk` settles that). Other shapes and devices use ``topk`` itself.
    """
    rows, h = logits.shape
    if logits.device.type != "cpu" or h % width or h < 8 * width or k > 16 or rows * h < 2**22:
        values, indices = logits.topk(k + 1, dim=-1)
        return values[:, :k], indices[:, :k], values[:, k]
    groups = h // width
    group_max = logits.reshape(rows, groups, width).amax(1)  # (P, width): max of j, j + width, ...
    best = group_max.topk(k, dim=-1).indices  # topk(k + 1) is several times slower on CPU here
    offsets = width * torch.arange(groups, device=logits.device)
    candidates = (best.unsqueeze(-1) + offsets).flatten(1)  # (P, k*groups)
    found = logits.gather(-1, candidates)
    values, picked = found.topk(k, dim=-1)
    following = torch.maximum(_max_without(found, picked), _max_without(group_max, best))
    return values, candidates.gather(-1, picked), following


def _max_without(values: Tensor, taken: Tensor) -> Tensor:
    """Each row's maximum outside the columns ``taken``: (n, m), (n, j) -> (n,)."""
    return values.scatter(-1, taken, float("-inf")).amax(-1)


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


def stack_factors(factors: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The (A (r, in), B (out, r)) of m adapters as :func:`gathered_delta` takes them: A (m + 1, r, in)
    and B^T (m + 1, r, out), ranks padded to the largest with zero rows (which add nothing), and a
    last all-zero slot for rows of no adapter."""
    r = max(a.shape[0] for a, _ in factors)
    a0, b0 = factors[0]
    a = [F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in factors] + [a0.new_zeros(r, a0.shape[1])]
    bt = [F.pad(b.T, (0, 0, 0, r - b.shape[1])) for _, b in factors] + [b0.new_zeros(r, b0.shape[0])]
    return torch.stack(a), torch.stack(bt)


def gathered_delta(x: Tensor, a: Tensor, bt: Tensor, index: Tensor | None) -> Tensor:
    """Every row's adapter branch ``B_i (A_i x)`` in two batched matmuls, whatever the number of
    adapters (Punica's BGMV/SGMV idea in plain torch): the rows' factors are gathered once, not one
    ``index_select`` + two matmuls + ``index_add`` per adapter.

    Args:
        x: (N, ..., in) inputs, row n through adapter ``index[n]``.
        a: (m, r, in) the A of each adapter of the batch.
        bt: (m, r, out) the transposed B of each adapter.
        index: (N,) long, each row's adapter; rows without one point at an all-zero slot. None:
            row n through adapter n (no gather).

    Returns:
        (N, ..., out) in the factors' dtype.
    """
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])  # (N, L, in)
    if index is None:
        rows_a, rows_bt = a[:n], bt[:n]
    else:
        rows_a, rows_bt = a.index_select(0, index), bt.index_select(0, index)
    h = torch.bmm(x3, rows_a.transpose(1, 2))  # (N, L, r)
    return torch.bmm(h, rows_bt).reshape(*x.shape[:-1], bt.shape[-1])


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


def linear_with_adapter_recomputed(
    x: Tensor, weight_fn: Callable[[], Tensor], bias: Tensor | None, a: Tensor, b: Tensor
) -> Tensor:
    """:func:`linear_with_adapter` over a frozen weight that ``weight_fn`` rebuilds (a quantized
    layer's dequantized weight): built in forward and again in backward, never kept between them,
    so the step holds no more full-precision weights than the quantized layer's own matmul does."""
    return _RecomputedLinearWithAdapter.apply(x, bias, a, b, weight_fn)


class _RecomputedLinearWithAdapter(torch.autograd.Function):
    """Autograd of :func:`linear_with_adapter_recomputed`: no weight gradient (the weight is frozen)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, weight_fn: Callable[[], Tensor]
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        weight = weight_fn()  # (out, in)
        h = x2 @ a.T  # (N, r)
        y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        y.addmm_(h, b.T)  # (N, out)
        ctx.save_for_backward(x2, a, b, h)
        ctx.weight_fn, ctx.x_shape = weight_fn, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, a, b, h = ctx.saved_tensors
        need_x, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = g @ b if need_x or need_a else None  # (N, r)
        gx = (g @ ctx.weight_fn()).addmm_(gh, a).view(ctx.x_shape) if need_x else None
        gbias = g.sum(0) if need_bias else None
        ga = gh.T @ x2 if need_a else None
        gb = g.T @ h if need_b else None
        return gx, gbias, ga, gb, None


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k selected indices (P, k) and their softmax weights (P, k) of each row of ``logits``."""
    values, indices = select_topk(logits, k)
    return indices, values.float().softmax(dim=-1)


def logits_from_topk(indices: Tensor, weights: Tensor, num_vectors: int) -> Tensor:
    """Dense logits whose top-k admixture equals the stored one: log-weights, -inf elsewhere.

    ``softmax(log w) = w`` when the weights sum to one, and -inf rows are never selected, so
    composing these logits reproduces the stored sub-vectors exactly.
    """
    dense = torch.full((*indices.shape[:-1], num_vectors), float("-inf"), dtype=torch.float32)
    return dense.scatter(-1, indices.long(), weights.float().log())
