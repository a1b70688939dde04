"""Tokenising the demo data: unpadded :class:`Encoded` sets; :func:`batches` pads each batch to its
own longest sequence, which on short, uneven sentences saves most of the compute that padding to
the longest sequence of the whole set would waste."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from .assets import DataError
from .corpora import QAPair, TextExample

IGNORE_INDEX = -100  # the label value Hugging Face losses skip


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples, unpadded; :func:`batches` pads them per batch.

    Attributes:
        input_ids: One list of token ids per example.
        labels: One class index per example (classification), or one target id per token with
            ``-100`` where no loss is taken (causal LM).
        pad_token_id: The id :func:`batches` pads ``input_ids`` with.
        dropped: Examples left out (causal LM: the prompt alone fills ``max_length``).
    """

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_token_id: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the padding id: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token"
        )
    return int(pad)


def _check_length(name: str, value: int) -> None:
    """Reject a non-positive length or size argument."""
    if value < 1:
        raise DataError(f"{name} must be at least 1, got {value}")


def encode_classification(
    examples: Sequence[TextExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Encoded:
    """Tokenise texts for sequence classification, with the tokenizer's special tokens, unpadded.

    Args:
        examples: The labelled texts.
        tokenizer: A Hugging Face tokenizer.
        max_length: Longer texts are truncated to this many tokens.

    Returns:
        One token list and one class index per example.
    """
    _check_length("max_length", max_length)
    if not examples:
        raise DataError("no examples to encode")
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return Encoded([list(x) for x in ids], [e.label for e in examples], pad_token_id(tokenizer))


def encode_chat_sft(pairs: Sequence[QAPair], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise question/answer pairs for supervised fine-tuning of a causal LM on the answers only.

    With a chat template the question is the user turn and the answer the assistant turn; without one
    the text is ``"Question: {q}\\nAnswer: {a}"`` followed by the eos token when there is one. Labels
    are ``-100`` on the prompt, so the loss covers the answer tokens (and the template's end-of-turn
    tokens, which teach the model to stop). Texts longer than ``max_length`` are cut at the end; pairs
    whose prompt alone fills ``max_length`` are dropped.

    Raises:
        DataError: If the template does not render the prompt as a prefix of the conversation, or if
            every prompt fills ``max_length``.
    """
    _check_length("max_length", max_length)
    if not pairs:
        raise DataError("no question/answer pairs to encode")
    input_ids, labels = [], []
    for i, pair in enumerate(pairs):
        prompt, full = _sft_token_ids(pair, tokenizer)
        if full[: len(prompt)] != prompt:
            raise DataError(
                f"pair {i}: the tokenised prompt is not a prefix of the tokenised conversation, so the "
                "answer tokens cannot be found; use a chat template whose generation prompt ends a token"
            )
        if len(prompt) >= max_length:
            continue
        full = full[:max_length]
        input_ids.append(full)
        labels.append([IGNORE_INDEX] * len(prompt) + full[len(prompt) :])
    if not input_ids:
        raise DataError(f"max_length {max_length} is too short: every prompt fills it; raise max_length")
    return Encoded(input_ids, labels, pad_token_id(tokenizer), dropped=len(pairs) - len(input_ids))


def _sft_token_ids(pair: QAPair, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Return the token ids of the prompt (up to where the answer starts) and of the whole exchange."""
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": pair.question}
        assistant = {"role": "assistant", "content": pair.answer}
        prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([user, assistant], tokenize=False)
        eos: list[int] = []  # the template writes its own end-of-turn tokens
    else:
        # the space belongs to the answer: BPE glues it to the next word, so "Answer:" stays a prefix
        prompt_text = f"Question: {pair.question}\nAnswer:"
        full_text = f"{prompt_text} {pair.answer}"
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # the template (or our format) already holds every special token it wants; letting the tokenizer add
    # its own would, e.g., prepend a second <|im_start|> with SmolLM2's GGUF tokenizer on transformers 4
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    return list(prompt), list(full) + eos


def encode_lm_chunks(text: str, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Encoded:
    """Tokenise a long text into contiguous blocks for causal-LM training (labels = input ids).

    The model shifts labels itself, so each block predicts its own next tokens. The last, partial
    block is dropped so every block has ``block_size`` tokens.

    Raises:
        DataError: If the text is shorter than one block.
    """
    _check_length("block_size", block_size)
    # verbose=False: the whole-text encoding is meant to exceed model_max_length; don't warn about it
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than block_size {block_size}; lower it")
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Encoded(blocks, [list(b) for b in blocks], pad_token_id(tokenizer))


def batches(
    encoded: Encoded, batch_size: int, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches padded on the right to their own longest sequence.

    Args:
        encoded: From one of the ``encode_*`` functions.
        batch_size: Examples per batch; the last batch may be smaller.
        shuffle: Visit the examples in an order drawn from ``seed`` (else in order).
        seed: Seeds a private ``random.Random``; the same seed gives the same batches.

    Yields:
        ``input_ids`` and ``attention_mask`` of shape ``(batch, longest)`` and ``labels`` of shape
        ``(batch,)`` (classification) or ``(batch, longest)`` with ``-100`` on padding (causal LM).
    """
    _check_length("batch_size", batch_size)
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield _collate(encoded, order[start : start + batch_size])


def _collate(encoded: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """Pad the chosen examples into one batch of tensors."""
    seqs = [encoded.input_ids[i] for i in indices]
    longest = max(len(s) for s in seqs)
    pads = [longest - len(s) for s in seqs]
    batch = {
        "input_ids": torch.tensor([s + [encoded.pad_token_id] * p for s, p in zip(seqs, pads)]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * p for s, p in zip(seqs, pads)]),
    }
    labels = [encoded.labels[i] for i in indices]
    if labels and isinstance(labels[0], list):
        batch["labels"] = torch.tensor([y + [IGNORE_INDEX] * p for y, p in zip(labels, pads)])
    else:
        batch["labels"] = torch.tensor(labels)
    return batch
