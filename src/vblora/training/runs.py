"""A training run's folder: written atomically, described by ``metrics.json``, reloadable.

``vblora train`` writes ``<output>/adapter/`` (the adapter directory), ``metrics.json`` (the metric
before and after each epoch, time, parameter counts, adapter bytes, the settings and the
environment) and ``training.png``. The other commands reopen such a folder, or a bare adapter folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
from collections.abc import Iterator
from typing import Any

from ..files import load_compact
from ..formats.atomic import existing_ancestor, publish_folder, staging_folder
from ..model import VBLoRAModel
from ..version import __version__
from . import loop as T
from .launch import SINGLE, Launch
from .loop import CAUSAL_LM, SEQ_CLS, RunError, RunSettings

METRICS_NAME = "metrics.json"
ADAPTER_DIR = "adapter"
COMPACT_NAME = "adapter.vblora"  # written next to adapter/ by `vblora train --compact`


# =========================================================================== output folders


def check_output(path: pathlib.Path, overwrite: bool, keep: tuple[pathlib.Path, ...] = ()) -> None:
    """Refuse an output that cannot be written, or an existing one (unless ``overwrite``), before any
    work is done. ``keep``: inputs the output must not replace (the run being merged)."""
    try:
        target = path.expanduser().resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise RunError(f"--output {path}: cannot be resolved ({err}); choose another --output") from None
    if path.exists() and not path.is_dir():
        raise RunError(f"--output {path} exists and is not a folder; choose another --output")
    anchor = existing_ancestor(target.parent)  # where the output is created, or renamed into place
    if not anchor.is_dir():
        raise RunError(f"--output {path}: {anchor} is a file, not a folder; choose another --output")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RunError(f"--output {path}: cannot write in {anchor} (permission denied); choose another")
    protected = [p.expanduser().resolve() for p in (pathlib.Path.cwd(), pathlib.Path.home(), *keep)]
    for folder in protected:
        if folder == target or target in folder.parents:
            raise RunError(
                f"--output {path} is or holds {folder}, which replacing it would delete; choose another"
            )
    if path.exists() and not overwrite:
        raise RunError(
            f"--output {path} already exists; pass --overwrite to replace it or choose another --output"
        )


@contextlib.contextmanager
def staged_output(path: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yield a temporary folder that replaces ``path`` when the block succeeds and vanishes otherwise.

    The temporary folder sits in the nearest existing ancestor of ``path`` (same file system, so the
    final rename is atomic); missing parent folders are only created at that rename.
    """
    check_output(path, overwrite)
    path = path.expanduser().resolve()
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(staging_folder(path))
        except OSError as err:
            raise RunError(f"--output {path}: cannot create it ({err.strerror}); choose another") from None
        yield tmp
        check_output(path, overwrite)  # it may have appeared while we worked
        publish_folder(tmp, path, replace=True)


def portable(model: str) -> str:
    """What to record as the model: packaged aliases and hub names as given, local folders absolute."""
    if model in T.MODEL_ALIASES or not pathlib.Path(model).expanduser().exists():
        return model
    return str(pathlib.Path(model).expanduser().resolve())


def quiet_transformers() -> None:
    """No weight-loading bars or "newly initialised head" warnings: the head is meant to be new."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# =========================================================================== metrics


def train_metrics(
    s: RunSettings,
    history: T.History,
    model: Any,
    adapter: pathlib.Path,
    total_seconds: float,
    launch: Launch = SINGLE,
) -> dict[str, Any]:
    """The content of ``metrics.json``: ``before``/``after`` are the held-out metric at step 0 and the
    end; ``processes`` how many trained together (torchrun), how, and on which device."""
    trainable, total = model.get_nb_trainable_parameters()
    vblora, other = model.get_nb_savable_parameters()
    metric = T.metric_name(s.task)
    metrics: dict[str, Any] = {
        "task": s.task,
        "metric": metric,
        "before": history.evals[0][1],
        "after": history.evals[-1][1],
        "evals": [{"step": step, metric: value} for step, value in history.evals],
        "losses": history.losses,
        "steps": len(history.losses),
        "train_seconds": round(history.train_seconds, 2),
        "total_seconds": round(total_seconds, 2),
        "trainable_params": trainable,
        "total_params": total,
        "savable_params": {"vblora": vblora, "other": other},
        "adapter_bytes": adapter_bytes(adapter),
        "compact_bytes": (adapter.parent / COMPACT_NAME).stat().st_size if s.compact else None,
        "settings": dataclasses.asdict(s),
        "processes": processes(launch),
        "environment": environment(),
    }
    if s.task == CAUSAL_LM:
        metrics["perplexity_before"] = perplexity(metrics["before"])
        metrics["perplexity_after"] = perplexity(metrics["after"])
    return metrics


def processes(launch: Launch) -> dict[str, Any]:
    """The launch of a run: its world size, DDP or FSDP2 (or none), the backend and device type."""
    parallel = ("fsdp2" if launch.fsdp else "ddp") if launch.distributed else None
    backend = launch.backend if launch.distributed else None
    return {
        "world_size": launch.world_size,
        "parallel": parallel,
        "backend": backend,
        "device": launch.device.type,
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def adapter_bytes(folder: pathlib.Path) -> dict[str, int]:
    """Bytes of the saved adapter: the weights file, and its tensors split into VB-LoRA and other."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    vblora = other = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            t = f.get_tensor(key)
            n = t.numel() * t.element_size()
            vblora, other = (vblora + n, other) if "vblora_" in key else (vblora, other + n)
    return {"file": path.stat().st_size, "vblora_tensors": vblora, "other_tensors": other}


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "vblora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_summary(m: dict[str, Any], output: pathlib.Path) -> None:
    """The end of ``vblora train``: metric before and after, time, parameters, bytes, files."""
    metric = m["metric"]
    per_epoch = ", ".join(f"{e[metric]:.4f}" for e in m["evals"][1:])
    b = m["adapter_bytes"]
    print(f"\n{metric}: {m['before']:.4f} before training -> {m['after']:.4f} after (per epoch: {per_epoch})")
    if "perplexity_after" in m:
        print(f"perplexity: {m['perplexity_before']:.2f} -> {m['perplexity_after']:.2f}")
    print(
        f"time: {m['train_seconds']:.0f} s training, {m['total_seconds']:.0f} s in all ({m['steps']} steps)"
    )
    p = m.get("processes") or {}
    if p.get("world_size", 1) > 1:
        how = f"{p['parallel']}, {p['backend']} on {p['device']}"
        print(f"processes: {p['world_size']} ({how}), each trained on its share of every batch")
    print(
        f"params: {m['trainable_params']:,} trainable, {m['savable_params']['vblora']:,} VB-LoRA savable "
        f"(float32-equivalent) + {m['savable_params']['other']:,} head"
    )
    kind = "full-logits" if m["settings"]["save_full_logits"] else "top-k"
    print(
        f"saved {kind} adapter: {b['file']:,} bytes in adapter_model.safetensors "
        f"({b['vblora_tensors']:,} VB-LoRA tensor bytes + {b['other_tensors']:,} head)"
    )
    if m.get("compact_bytes"):
        print(
            f"compact file: {m['compact_bytes']:,} bytes in {COMPACT_NAME} ({m['settings']['compact']} bank)"
        )
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in output.iterdir())
    print(f"wrote {output}/: {', '.join(names)}")


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# =========================================================================== loading a saved run


@dataclasses.dataclass
class SavedRun:
    """An adapter folder and, when it came from `vblora train`, the run's settings and metrics."""

    adapter: pathlib.Path
    settings: RunSettings
    metrics: dict[str, Any] | None


def open_run(path: pathlib.Path, overrides: dict[str, Any]) -> SavedRun:
    """Find the adapter in ``path`` and the settings that rebuild its model and data.

    Args:
        path: a folder written by ``vblora train``, or an adapter folder.
        overrides: RunSettings fields that replace the recorded ones (e.g. another ``data`` file).
    """
    if path.is_file() and path.name == COMPACT_NAME:
        raise RunError(f"{path} is a compact file; pass the run folder that holds it, with --from-compact")
    if not path.is_dir():
        raise RunError(
            f"{path}: no such folder; pass a folder written by `vblora train` or an adapter folder"
        )
    adapter = path / ADAPTER_DIR if (path / ADAPTER_DIR / "adapter_config.json").is_file() else path
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise RunError(f"{path}: no adapter_config.json here or in {ADAPTER_DIR}/; pass an adapter folder")
    metrics_file = path / METRICS_NAME if adapter != path else adapter.parent / METRICS_NAME
    metrics = None
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            settings = RunSettings(**metrics["settings"])
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise RunError(f"{metrics_file}: not a metrics.json written by `vblora train` ({err})") from None
    else:
        settings = _settings_from_adapter(config_file)
    return SavedRun(adapter, dataclasses.replace(settings, **overrides).resolved(), metrics)


def _settings_from_adapter(config_file: pathlib.Path) -> RunSettings:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise RunError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise RunError(f"{config_file}: not a VB-LoRA adapter config (expected a JSON object)")
    task = CAUSAL_LM if str(config.get("task_type", "")).upper() == "CAUSAL_LM" else SEQ_CLS
    return RunSettings(task=task, model=config.get("base_model_name_or_path"))


def _saved_label_count(path: pathlib.Path) -> int | None:
    """Rows of the saved classifier head (``classifier``/``score`` in modules_to_save), if any: the
    label count of an adapter folder that has no metrics.json to name its labels."""
    import re

    from safetensors import SafetensorError, safe_open

    file = path if path.is_file() else path / "adapter_model.safetensors"
    head = re.compile(r"(?:^|\.)(?:classifier|score)\.(?:out_proj\.)?weight$")  # PEFT's key: no copy name
    with contextlib.suppress(OSError, ValueError, SafetensorError), safe_open(str(file), framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if head.search(k)]  # noqa: SIM118
        return rows[0] if len(set(rows)) == 1 else None
    return None


def load_saved_model(
    run: SavedRun, compact: bool = False, label_names: list[str] | None = None
) -> tuple[Any, Any]:
    """The base model named by the run with its saved adapter loaded (inference mode): the adapter
    folder, or with ``compact`` the run's compact file. A classifier gets ``label_names``, else the
    run's labels, else as many as the saved head has rows."""
    path = run.adapter.parent / COMPACT_NAME if compact else run.adapter
    if compact and not path.is_file():
        raise RunError(f"{path}: no such file; write it with `vblora train --compact int8` (or float16)")
    quiet_transformers()
    s = run.settings
    assert s.model is not None
    labels = label_names or s.labels
    if labels is None and s.task == SEQ_CLS:
        labels = [str(i) for i in range(_saved_label_count(path) or 2)]
    base, tokenizer = T.load_base_model(s.task, s.model, label_names=labels, quantization=s)
    try:
        model = load_compact(base, path) if compact else VBLoRAModel.from_pretrained(base, path)
    except (ValueError, TypeError) as err:  # one line: the loader's summary and its first problem
        summary, *problems = str(err).splitlines()
        message = summary if str(path) in summary else f"{path}: {summary}"
        if problems:  # the adapter does not fit this base model (or the file is inconsistent)
            first = problems[0].strip().removeprefix("- ")
            message = (
                f"{message.rstrip(':')}; first: {first} (base model: {s.model}; --model chooses another)"
            )
        raise RunError(message) from None
    return model, tokenizer
