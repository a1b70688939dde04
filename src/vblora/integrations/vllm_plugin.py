"""vLLM serves ``.vblora`` files: a LoRA resolver plugin.

When vLLM gets a request whose ``model`` it does not know, it asks its LoRA resolvers. Ours looks
for ``<name>.vblora`` (or a ``<name>/`` VB-LoRA directory) in ``$VBLORA_VLLM_ADAPTERS``, writes
its exact LoRA export (``lora_alpha = r``, no SVD) into ``$VBLORA_VLLM_CACHE`` once per version of
the file, and hands vLLM a ``LoRARequest`` for that folder. vLLM then batches and serves it as any
LoRA adapter; our files stay 20-50x smaller than LoRA on disk and on the wire.

The export needs no base model: the compact file's header (or a directory's tensor shapes) holds
every module's sizes. Registered by our package's entry point (``vllm.general_plugins``); vLLM
loads it when ``VLLM_PLUGINS`` names ``vblora`` (or is unset) and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from torch import Tensor

from ..core.bank import AdapterBank, Slot, build_layout
from ..core.config import VBLoRAConfig
from ..formats.atomic import write_files
from ..formats.compact import COMPACT_ADAPTER_TENSORS, read_compact
from ..formats.contents import Loaded, assemble, check_bank, module_rows
from ..formats.lora_export import lora_files
from ..formats.peft_dir import AdapterExport
from ..formats.readers import CONFIG_NAME, PREFIX, FormatError, read_directory, split_peft_keys
from ..injection.plan import AdapterPlan
from ..serving.store import COMPACT_SUFFIX, find_adapter, stamp_of

ADAPTERS_ENV = "VBLORA_VLLM_ADAPTERS"  # folders of adapters, separated by os.pathsep
CACHE_ENV = "VBLORA_VLLM_CACHE"  # where the LoRA exports are written (default: a sibling .lora-cache)
RESOLVER_NAME = "vblora"


def _bank(config: VBLoRAConfig, layout: dict[str, Slot], bank: Tensor, loaded: Loaded | None) -> AdapterBank:
    """An AdapterBank holding a read adapter (no model): the bank and its selection or logits."""
    out = AdapterBank(layout, config.num_vectors, config.vector_length, config.topk, initialise=False)
    out.requires_grad_(False)
    out.bank.data = bank.float()
    if loaded is not None and loaded.logits is not None:
        out.logits.data = loaded.logits.float()
    return out


def read_adapter(path: Path) -> AdapterExport:
    """A ``.vblora`` file or a VB-LoRA directory as the formats write it, with no model.

    Raises:
        FormatError: unreadable, or inconsistent with itself (every problem listed).
    """
    if path.suffix == COMPACT_SUFFIX:
        contents = read_compact(path)
        bank = _bank(contents.config, contents.layout, contents.bank, None)
        bank.keep_topk(contents.indices, contents.weights)
        aux = {k: v for k, v in contents.tensors.items() if k not in COMPACT_ADAPTER_TENSORS}
        return AdapterExport(path.stem, contents.config, bank, aux)
    config, tensors, folder = read_directory(path)
    keys = split_peft_keys(tensors)
    b = config.vector_length
    shapes = []
    for module, parts in keys.modules.items():  # A: (r, in/b, ...), B: (out/b, r, ...)
        a, bb = (
            next((parts[(f, kind)] for kind in ("full", "indices") if (f, kind) in parts), None) for f in "AB"
        )
        if a is None or bb is None or a.dim() != 3 or bb.dim() != 3:
            raise FormatError(f"{folder}: {module}: vblora_logits_A/_B missing or not 3-dimensional")
        shapes.append((module, a.shape[1] * b, bb.shape[0] * b))
    layout = build_layout(shapes, config.r, b)
    loaded = Loaded(AdapterPlan(path.name, config, list(layout), layout))
    for key in keys.unexpected:
        loaded.add(f"{key}: unexpected key")
    check_bank(loaded, keys.bank)
    assemble(loaded, {m: module_rows(loaded, m, parts) for m, parts in keys.modules.items()})
    loaded.fail_if_problems(folder, None)
    assert loaded.bank is not None
    bank = _bank(config, layout, loaded.bank, loaded)
    if loaded.selection is not None:
        bank.keep_topk(*loaded.selection)
    return AdapterExport(path.name, config, bank, {f"{PREFIX}{k}": v for k, v in keys.other.items()})


def export_once(source: Path, cache: Path, base_model_name: str) -> Path:
    """The exact LoRA export of ``source`` for ``base_model_name``, written into ``cache`` the first
    time this version of the file is asked for (a folder named by the file's name and stamp, renamed
    into place whole, so concurrent callers and crashes never leave a half-written export)."""
    stamp = stamp_of(source)
    if stamp is None:
        raise FormatError(f"{source}: gone")
    key = f"{source.resolve()}|{stamp}|{base_model_name}".encode()
    folder = cache / f"{source.stem if source.suffix else source.name}-{hashlib.sha256(key).hexdigest()[:16]}"
    if (folder / CONFIG_NAME).is_file():
        return folder
    export = read_adapter(source)
    config = dataclasses.replace(export.config, base_model_name_or_path=base_model_name)
    staging = cache / f".partial-{uuid.uuid4().hex}"
    write_files(lora_files(staging, dataclasses.replace(export, config=config)))
    try:
        os.rename(staging, folder)
    except OSError:  # another process exported it first: theirs is the same
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / CONFIG_NAME).is_file():
            raise
    return folder


def lora_int_id(folder: Path) -> int:
    """A stable positive id per export (vLLM tells adapters apart by it): a new file version is a
    new id, so vLLM loads the new weights instead of serving the old ones."""
    return int(hashlib.sha256(str(folder).encode()).hexdigest()[:12], 16) % (2**31 - 2) + 1


class Resolver:
    """Resolves a requested name to a ``LoRARequest`` for the LoRA export of our adapter file.

    Args:
        folders: folders of ``<name>.vblora`` files and ``<name>/`` VB-LoRA directories.
        cache: where the exports go (created if missing).
        request_type: vLLM's ``LoRARequest`` (passed in, so this class imports no vLLM).
    """

    def __init__(self, folders: list[Path], cache: Path, request_type: Any) -> None:
        self.folders, self.cache, self.request_type = folders, cache, request_type
        cache.mkdir(parents=True, exist_ok=True)

    def resolve(self, base_model_name: str, lora_name: str) -> Any:
        """The ``LoRARequest``, or None when no adapter of that name exists (vLLM then 404s)."""
        source = find_adapter(self.folders, lora_name)
        if source is None:
            return None
        folder = export_once(source, self.cache, base_model_name)
        return self.request_type(lora_name=lora_name, lora_int_id=lora_int_id(folder), lora_path=str(folder))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        return await asyncio.to_thread(self.resolve, base_model_name, lora_name)


def resolver_from_env(request_type: Any) -> Resolver | None:
    """The resolver that ``$VBLORA_VLLM_ADAPTERS`` and ``$VBLORA_VLLM_CACHE`` describe, or None
    when no folder is set."""
    folders = [Path(p) for p in os.environ.get(ADAPTERS_ENV, "").split(os.pathsep) if p]
    if not folders:
        return None
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{ADAPTERS_ENV}: {folder} is not a folder")
    cache = Path(os.environ.get(CACHE_ENV) or folders[0].parent / f".{folders[0].name}.lora-cache")
    return Resolver(folders, cache, request_type)


def register() -> None:
    """vLLM's entry point (``vllm.general_plugins``): register the resolver when configured."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    resolver = resolver_from_env(LoRARequest)
    if resolver is None:
        return

    class VBLoRAResolver(LoRAResolver):  # vLLM checks the base class
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            return await resolver.resolve_lora(base_model_name, lora_name)

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, VBLoRAResolver())
