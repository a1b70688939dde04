"""VBLoRAConfig: the hyper-parameters of one VB-LoRA adapter.

Field names and defaults are PEFT's, so an ``adapter_config.json`` written by PEFT loads here and
one written here loads in PEFT. The config is validated when it is built and is never mutated
afterwards (it is a frozen dataclass; use :func:`dataclasses.replace` to derive a new one).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class PeftTypeName(str):
    """``"VBLORA"`` with the ``value`` and ``name`` of PEFT's ``PeftType`` enum member (it is a
    ``str``, so it compares equal to ``PeftType.VBLORA`` and is written to JSON as a string)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


PEFT_TYPE = PeftTypeName("VBLORA")
CONFIG_FILE = "adapter_config.json"
# PEFT's TaskType values, in its order (its error message lists them so).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The PEFT release whose adapter format and config fields this version writes.
PEFT_FORMAT_VERSION = "0.21.2"
_BIAS_CHOICES = ("none", "all", "vblora_only")
# Keys PEFT writes that carry no meaning for us; read silently.
_PEFT_ONLY_KEYS = frozenset({"runtime_config"})


def peft_version() -> str:
    """What ``peft_version`` records: the installed PEFT's version (read from its metadata, PEFT is
    not imported), else the PEFT release whose format is written. A dev version is ambiguous, and
    no commit hash can be read without importing PEFT: recorded as ``<version>@UNKNOWN`` with a
    warning, as PEFT does when it cannot find the commit."""
    version = _installed_peft()
    if version is None:
        return PEFT_FORMAT_VERSION
    if "dev" in version:
        warnings.warn(
            f"a dev version of PEFT ({version}) is installed; its commit hash is not determined, "
            f"so peft_version is recorded as {version}@UNKNOWN",
            stacklevel=4,
        )
        return f"{version}@UNKNOWN"
    return version


@functools.cache
def _installed_peft() -> str | None:
    """The installed PEFT's version, read once (every config built reads it: a serving load builds
    several, and a metadata lookup is slower than the rest of the config)."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    """PEFT's str enums (TaskType, PeftType) as their plain string values."""
    return getattr(value, "value", value) if isinstance(value, str) else value


def _as_tuple(value: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """Freeze a list of names into a tuple, keep a regex string (or None) as it is."""
    if value is None or isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        return value  # a non-iterable (or a dict) is reported by the validation
    return tuple(value)


def _finite(value: float) -> bool:
    """``math.isfinite`` that says False, not OverflowError, for an int beyond the float range."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"VBLoRAConfig: {name} {value!r} is not a valid regex ({err})") from None


@dataclass(frozen=True)
class VBLoRAConfig:
    """Configuration of a VB-LoRA adapter (PEFT's ``VBLoRAConfig`` fields and defaults).

    Args:
        r: Rank of the low-rank factors A (r x in) and B (out x r).
        num_vectors: Number of vectors h in the shared vector bank.
        vector_length: Length b of each bank vector; must divide the in and out features of every
            targeted layer.
        topk: Number of bank vectors mixed into each sub-vector (k).
        target_modules: Modules to adapt: a list of exact names or ``.name`` suffixes, a regex
            string matched against the full module path, ``"all-linear"``, or None for the
            default targets of the transformers ``model_type``.
        exclude_modules: Modules never to adapt (same matching rules).
        save_only_topk_weights: Save k indices and k-1 weights per sub-vector instead of the full
            logits (inference-only checkpoints).
        vblora_dropout: Dropout probability on the adapter branch's input.
        fan_in_fan_out: Kept for PEFT compatibility; the layout is read from each layer itself.
        bias: ``"none"``, ``"all"`` or ``"vblora_only"``: which biases to train and save.
        modules_to_save: Modules (e.g. a classifier head) trained in full and saved.
        init_vector_bank_bound: The bank is initialised from U(-bound, bound).
        init_logits_std: The logits are initialised from N(0, std).
        layers_to_transform: Layer indices to adapt (needs a list ``target_modules``).
        layers_pattern: Name of the module list that holds the layers (e.g. ``"layers"``, ``"h"``).
        task_type: PEFT task type (e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``), informational.
        base_model_name_or_path: Name or path of the base model, informational.
        revision: Revision of the base model, informational.
        inference_mode: Whether the adapter was saved for inference, informational.
        peft_type: Always ``"VBLORA"`` (PEFT's ``PeftType.VBLORA`` compares equal); accepted so that
            PEFT's ``adapter_config.json`` and ``VBLoRAConfig(peft_type=...)`` calls work.
        peft_version: The PEFT version the format matches; filled in when omitted (see
            :func:`peft_version`) and kept when read from a file.
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = field(default=False, compare=False)
    peft_type: str = field(default=PEFT_TYPE, compare=False)
    peft_version: str | None = field(default=None, compare=False)
    auto_mapping: dict[str, Any] | None = field(default=None, compare=False)  # PEFT's; kept as read

    # PEFT's class attributes: VB-LoRA is not a prompt-learning method.
    is_prompt_learning = False
    is_adaption_prompt = False

    def __post_init__(self) -> None:
        for name in ("task_type", "peft_type"):
            object.__setattr__(self, name, _plain(getattr(self, name)))
        if str(self.peft_type).upper() != PEFT_TYPE:
            raise ValueError(f"not a VB-LoRA config: peft_type is {self.peft_type!r}, expected {PEFT_TYPE!r}")
        object.__setattr__(self, "peft_type", PEFT_TYPE)
        if self.peft_version is None:
            object.__setattr__(self, "peft_version", peft_version())
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.layers_to_transform, Sequence):
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VBLoRAConfig: {name} must be a positive integer, got {value!r}")

        for name in ("r", "num_vectors", "vector_length", "topk"):
            positive_int(name)
        for name in ("save_only_topk_weights", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):  # "false" would be truthy
                raise ValueError(f"VBLoRAConfig: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("vblora_dropout", "init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                shown = "an integer too large for a float" if isinstance(value, int) else repr(value)
                raise ValueError(f"VBLoRAConfig: {name} must be a finite number, got {shown}")
        for name in ("task_type", "base_model_name_or_path", "revision", "peft_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"VBLoRAConfig: {name} must be a string, got {getattr(self, name)!r}")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ValueError(f"VBLoRAConfig: auto_mapping must be a JSON object, got {self.auto_mapping!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:  # PEFT's message
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(TASK_TYPES)}."
            )
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, str):
                if name != "layers_pattern":  # the others are regexes over module paths
                    _check_regex(name, value)
            elif value is not None and not (
                isinstance(value, tuple) and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(
                    f"VBLoRAConfig: {name} must be a list of module names or a regex string, got {value!r}"
                )
        if self.topk > self.num_vectors:
            raise ValueError(
                f"VBLoRAConfig: topk={self.topk} exceeds num_vectors={self.num_vectors}; "
                "topk selects that many bank vectors per sub-vector, so choose topk <= num_vectors"
            )
        if not 0.0 <= self.vblora_dropout < 1.0:
            raise ValueError(f"VBLoRAConfig: vblora_dropout must be in [0, 1), got {self.vblora_dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"VBLoRAConfig: bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.init_vector_bank_bound < 0 or self.init_logits_std < 0:
            raise ValueError("VBLoRAConfig: init_vector_bank_bound and init_logits_std must be >= 0")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "VBLoRAConfig: layers_pattern needs layers_to_transform (the indices of the layers to adapt)"
            )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "VBLoRAConfig: layers_to_transform cannot be used with a regex target_modules; "
                "put the layer indices into the regex, or pass target_modules as a list of names"
            )
        layers = self.layers_to_transform
        if layers is not None and not isinstance(layers, (int, tuple)):
            raise ValueError(
                f"VBLoRAConfig: layers_to_transform must be an index or a list of them, got {layers!r}"
            )
        indices = (layers,) if isinstance(layers, int) else (layers or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"VBLoRAConfig: layers_to_transform must hold indices >= 0, got {layers!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, with PEFT's keys (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VBLoRAConfig:
        """Build a config from a dict such as PEFT's ``adapter_config.json``.

        Unknown keys are ignored with a warning; a ``peft_type`` other than VBLORA is an error.
        """
        peft_type = data.get("peft_type", PEFT_TYPE)
        peft_type = getattr(peft_type, "value", peft_type)  # PEFT's in-memory dicts hold its enum
        if str(peft_type).upper() != PEFT_TYPE:
            raise ValueError(f"not a VB-LoRA config: peft_type is {peft_type!r}, expected {PEFT_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _PEFT_ONLY_KEYS)
        if unknown:
            warnings.warn(  # PEFT's wording
                f"Unexpected keyword arguments {unknown} for class VBLoRAConfig, these are ignored.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ PEFT's file methods
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if missing), as PEFT's
        ``PeftConfig.save_pretrained``; the file is replaced atomically. Extra ``kwargs`` (PEFT's
        hub options) are refused: nothing is uploaded."""
        if kwargs:
            raise TypeError(
                f"VBLoRAConfig.save_pretrained: unexpected arguments {sorted(kwargs)} (no hub uploads)"
            )
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise ValueError(f"{folder}: is a file; save_pretrained needs a directory")
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter_config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, os.path.join(folder, CONFIG_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> VBLoRAConfig:
        """Read a local adapter directory's ``adapter_config.json`` (PEFT's ``from_pretrained``;
        nothing is downloaded). ``kwargs`` are config fields that override the file's."""
        folder = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file (vblora reads local directories only, never the hub)")
        data = cls.from_json_file(path)
        if "peft_type" not in data:  # not a PEFT config at all (PEFT's check and wording)
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                "{'peft_type'}."
            )
        hub_only = {"cache_dir", "token", "force_download", "local_files_only"}
        return cls.from_dict({**data, **{k: v for k, v in kwargs.items() if k not in hub_only}})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike[str]) -> dict[str, Any]:
        """The dict in a JSON config file, as PEFT's ``from_json_file`` returns it (its
        ``runtime_config`` entry dropped)."""
        with open(path_json_file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(path_json_file)}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path_json_file)}: expected a JSON object")
        data.pop("runtime_config", None)
        return data

    @classmethod
    def from_json(cls, text: str) -> VBLoRAConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("adapter config: expected a JSON object")
        return cls.from_dict(data)
