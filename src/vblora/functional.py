"""The math of VB-LoRA as pure functions over tensors.

Notation: h = num_vectors, b = vector_length, k = topk, r = rank, P = number of sub-vectors.
A sub-vector is the top-k admixture of bank vectors: ``s = sum_{i in topk(z)} softmax(z_topk)_i V[i]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_admixture(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """Compose every sub-vector from the bank.

    Args:
        logits: (P, h) logits, one row per sub-vector.
        bank: (h, b) vector bank.
        k: number of bank vectors mixed per sub-vector.

    Returns:
        (P, b) sub-vectors in the dtype of ``bank``.
    """
    values, indices = logits.topk(k, dim=-1)  # (P, k)
    weights = values.softmax(dim=-1).to(bank.dtype)  # softmax over the k selected logits only
    # embedding_bag sums the k weighted rows without materialising a (P, k, b) gather.
    return F.embedding_bag(indices, bank, per_sample_weights=weights, mode="sum")


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


def delta_weight(a: Tensor, b: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """The weight update B @ A: (out, in), or (in, out) for fan-in/fan-out layers like Conv1D."""
    delta = b @ a
    return delta.T if fan_in_fan_out else delta


def adapter_delta(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The adapter branch ``B (A x)`` applied to the last axis of x (dropout is the caller's)."""
    return F.linear(F.linear(x, a), b)


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
