"""Reading adapter files: the names PEFT's format uses, and readers shared by the loaders and by
``vblora inspect``. Only JSON and safetensors are ever read (never pickle)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor

from ..core.config import VBLoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's prefix for every per-module key
BANK_KEY = "base_model.vblora_vector_bank"
# Key suffix -> (factor, kind) of PEFT's per-module VB-LoRA tensors.
LOGIT_KEYS = {
    f".vblora_logits_{factor}{suffix}": (factor, kind)
    for factor in "AB"
    for suffix, kind in (("", "full"), ("_topk_indices", "indices"), ("_topk_weights", "weights"))
}

MAX_CONFIG_BYTES = 16 * 2**20  # an adapter config is a few KB; a larger one is refused unread
StrPath = str | PathLike[str]


class FormatError(ValueError):
    """An adapter file or folder that cannot be read, or does not fit the model it is loaded into."""


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[int]:
    """A read-only descriptor of ``path`` if it is a regular file (a FIFO or a device would block or
    never end); FormatError otherwise. Opened without blocking, then checked, so nothing waits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as err:
        raise FormatError(f"{path}: cannot be opened ({err.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file (a folder, FIFO or device); adapters are files")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def read_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """A small UTF-8 text file, read only up to ``limit`` bytes: a larger one is refused unread."""
    with open_regular(path) as fd:
        size = os.fstat(fd).st_size
        data = b"" if size > limit else os.read(fd, limit + 1)
    if size > limit or len(data) > limit:
        raise FormatError(f"{path}: {size:,} bytes, more than an adapter config can be ({limit:,})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: not UTF-8 JSON ({err})") from None


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a damaged file is a :class:`FormatError`.

    Only a regular file is opened (read through the descriptor checked, where /proc allows)."""
    from safetensors import SafetensorError, safe_open

    with open_regular(path) as fd:
        source = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(path)
        try:
            with safe_open(source, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, OverflowError, MemoryError) as err:
            raise FormatError(
                f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt. "
                "Save the adapter again, or restore the file from a backup"
            ) from None
    return tensors, metadata


def config_from_json(text: str, source: str) -> VBLoRAConfig:
    try:
        return VBLoRAConfig.from_json(text)
    except (TypeError, ValueError, RecursionError, OverflowError) as err:  # Recursion: absurd nesting
        raise FormatError(f"{source}: not a valid VB-LoRA adapter config: {err}") from None


def read_directory(path: StrPath) -> tuple[VBLoRAConfig, dict[str, Tensor], Path]:
    """The config and tensors of an adapter directory (ours or PEFT's); refuses pickle files."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not an adapter directory (expected a folder with {CONFIG_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / PICKLE_NAME).is_file():
        raise FormatError(
            f"{folder / PICKLE_NAME}: pickle checkpoints are never loaded (unpickling can run arbitrary "
            f"code). If you trust the file, convert it once to {WEIGHTS_NAME}:\n"
            "  import torch, safetensors.torch as st\n"
            f"  st.save_file(torch.load('{PICKLE_NAME}', weights_only=True), '{WEIGHTS_NAME}')\n"
            "or load it with peft and call save_pretrained(..., safe_serialization=True)"
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(f"{folder}: no {CONFIG_NAME}; is this an adapter directory?")
    config = config_from_json(read_text(config_path), str(config_path))
    tensors, _ = read_safetensors(weights)
    return config, tensors, folder


@dataclass
class PeftKeys:
    """A PEFT VB-LoRA state dict sorted by the structure of its keys."""

    bank: Tensor | None = None
    modules: dict[str, dict[tuple[str, str], Tensor]] = field(default_factory=dict)  # path -> parts
    other: dict[str, Tensor] = field(default_factory=dict)  # unprefixed: heads, biases, weights
    unexpected: list[str] = field(default_factory=list)  # keys outside PEFT's naming


def split_peft_keys(tensors: dict[str, Tensor]) -> PeftKeys:
    """Sort ``tensors`` by key: the bank, each module's ``vblora_logits_{A,B}`` parts by
    ``(factor, kind)`` (kind: ``full``, ``indices``, ``weights``), and the rest."""
    out = PeftKeys()
    for key, tensor in tensors.items():
        if key == BANK_KEY:
            out.bank = tensor
            continue
        if not key.startswith(PREFIX):
            out.unexpected.append(key)
            continue
        rest = key[len(PREFIX) :]
        suffix = next((s for s in LOGIT_KEYS if rest.endswith(s)), None)
        if suffix is None:
            out.other[rest] = tensor
        else:
            out.modules.setdefault(rest[: -len(suffix)], {})[LOGIT_KEYS[suffix]] = tensor
    return out


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's dtype for stored top-k indices."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64
