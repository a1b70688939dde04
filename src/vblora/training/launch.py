"""Multi-process training under torchrun: who this process is, its process group, its share of the data.

``torchrun --nproc-per-node N -m vblora train ...`` starts N copies of the command, each with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment (``vblora train --nproc-per-node N``
starts torchrun's launcher itself: :func:`launch_workers`). Every rank builds the same model and the
same global batches from the same seed and takes its rows of each (:func:`shard_rows`), weighted so
that the gradients averaged by DDP or FSDP2 are the gradients of the whole batch
(:func:`loss_weight`): N processes at batch B/N train as one process at batch B. Rank 0 (the main
process) alone prints and writes. Phases without collectives run inside :func:`together`, which
turns a failure on any rank into the same failure on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
EXIT_BAD_INPUT = 2  # the CLI's status for a bad input (and for a run stopped by another rank's)


class LaunchError(ValueError):
    """A launch that cannot work (environment, device, combination of options); one line."""


class RankFailed(LaunchError):
    """Raised on rank 0 when another rank failed: the message names that rank and says why."""


class PeerFailed(Exception):
    """Another rank failed (rank 0 says why); this rank stops without a message of its own."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run; the defaults describe a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # the model is sharded with FSDP2 (else DDP when distributed)

    @property
    def is_main(self) -> bool:
        """The process that prints and writes (nanoGPT's ``master_process``)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


SINGLE = Launch()


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return any(name in environ for name in ENV_NAMES)


def read_launch(
    device: str | None = None, fsdp: bool = False, environ: Mapping[str, str] = os.environ
) -> Launch:
    """The launch torchrun describes in ``environ`` (a single process when it describes none).

    ``device``: ``cpu`` (also for None: the CLI's other commands run there too), ``cuda`` (each
    rank its ``cuda:LOCAL_RANK``) or ``cuda:I`` (one process only).
    """
    present = [name for name in ENV_NAMES if name in environ]
    if present and len(present) < len(ENV_NAMES):
        missing = ", ".join(n for n in ENV_NAMES if n not in present)
        raise LaunchError(f"{', '.join(present)} set but not {missing}; start the processes with torchrun")
    values = {}
    for name in present:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise LaunchError(
                f"{name}={environ[name]!r} is not an integer; start the processes with torchrun"
            ) from None
    rank, local_rank, world = values.get("RANK", 0), values.get("LOCAL_RANK", 0), values.get("WORLD_SIZE", 1)
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank <= rank):
        raise LaunchError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world} do not fit together")
    if fsdp and world == 1:
        raise LaunchError("--fsdp shards the model across processes; start several (--nproc-per-node N)")
    return Launch(rank, local_rank, world, pick_device(device, local_rank, world), fsdp)


def check_options(launch: Launch, quantize: str | None = None) -> None:
    """Refuse the options this launch cannot run, before anything is loaded."""
    if launch.fsdp and quantize:
        raise LaunchError(
            f"--fsdp with --quantize {quantize}: FSDP2 cannot shard bitsandbytes' packed 4/8-bit weights "
            "(their quantization state is no tensor it can split); drop --fsdp to train with DDP, each "
            "process holding the whole quantized base"
        )


def pick_device(name: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of the rank with ``local_rank`` (see :func:`read_launch`)."""
    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LaunchError(f"--device {name}: not a device; choose cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise LaunchError(f"--device {name}: vblora train runs on cpu or cuda")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is not None and world_size > 1:
        raise LaunchError(
            f"--device {name}: with several processes pass --device cuda (each rank takes cuda:LOCAL_RANK)"
        )
    index = local_rank if device.index is None else device.index
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise LaunchError(
            f"--device {name}: this rank needs cuda:{index}, and the machine has {count} GPU(s)"
        )
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- the process group


@contextlib.contextmanager
def process_group(launch: Launch) -> Iterator[None]:
    """The run's process group (gloo on CPU, nccl on CUDA) for the block; nothing for one process.

    After a successful block every rank meets at a barrier before the group is torn down (gloo
    aborts a rank whose peer closes the group while it still uses it). SIGTERM (torchrun stopping
    the other ranks after one failed) unwinds like Ctrl-C, so no half-written output stays behind.
    """
    if not launch.distributed:
        yield
        return
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)
    device_id = launch.device if launch.device.type == "cuda" else None
    previous = signal.signal(signal.SIGTERM, _interrupt)
    dist.init_process_group(
        launch.backend, rank=launch.rank, world_size=launch.world_size, device_id=device_id
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def together(launch: Launch) -> Iterator[None]:
    """Run a block that makes no collective calls on every rank, then compare notes: if it failed on
    any rank, every rank raises. Rank 0 raises its own error, or a :class:`RankFailed` naming the
    failing rank and its message; the other ranks raise :class:`PeerFailed` (or their own
    unexpected error, whose traceback is worth seeing). The comparison is also a barrier.
    """
    if not launch.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    notes: list[str | None] = [None] * launch.world_size
    dist.all_gather_object(notes, None if error is None else one_line(error))
    failed = [(rank, note) for rank, note in enumerate(notes) if note is not None]
    if not failed:
        return
    if error is not None and (launch.is_main or not isinstance(error, ValueError)):
        raise error
    if launch.is_main:
        rank, note = failed[0]
        raise RankFailed(f"rank {rank} of {launch.world_size}: {note}")
    raise PeerFailed


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (gloo: the connection closed)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("closed by peer", "Connection reset by peer", "Broken pipe", "remote worker")
    )


def gather_model(model: nn.Module) -> None:
    """Un-shard every FSDP2 unit in place (collectives), so the model's parameters are whole,
    plain tensors: rank 0 can then save, count and write alone. Call it once training is over."""
    for module in model.modules():
        if callable(getattr(module, "unshard", None)) and callable(getattr(module, "reshard", None)):
            module.unshard()


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def sum_across(values: Sequence[float], launch: Launch) -> list[float]:
    """Each value summed over the ranks (float64, so counts stay exact); the values for one process."""
    if not launch.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=launch.device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- the data


def shard_rows(batch: Mapping[str, torch.Tensor], launch: Launch) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's rows of a global batch (contiguous, sizes differing by at most one), and whether
    they are real. A rank left without rows (a last batch smaller than the world) gets the first row
    of the batch to keep in step with the others; its loss weight is then 0."""
    if not launch.distributed:
        return dict(batch), True
    rows = {k: v.tensor_split(launch.world_size)[launch.rank] for k, v in batch.items()}
    if next(iter(rows.values())).shape[0]:
        return rows, True
    return {k: v[:1] for k, v in batch.items()}, False


def loss_items(batch: Mapping[str, torch.Tensor]) -> int:
    """What a transformers loss averages over: rows (1-d labels, a classifier) or labelled tokens
    after the shift by one (2-d labels, a causal LM)."""
    labels = batch["labels"]
    return labels.shape[0] if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


def loss_weight(
    shard: Mapping[str, torch.Tensor], real: bool, whole: Mapping[str, torch.Tensor], launch: Launch
) -> float:
    """The factor on this rank's mean loss that makes the gradient DDP and FSDP average (a mean over
    ranks) the gradient of the whole batch's mean loss: ``world * items(shard) / items(batch)``."""
    if not launch.distributed:
        return 1.0
    return launch.world_size * loss_items(shard) / max(1, loss_items(whole)) if real else 0.0


def eval_shards(n: int, batch_size: int, launch: Launch) -> list[list[int]]:
    """This rank's evaluation batches, as indices into ``n`` examples: every ``world``-th example
    from ``rank`` (so each rank gets all lengths of a length-sorted set), in batches; every rank gets
    the same number of batches (FSDP's forward is a collective), an empty one where it has run out.
    """
    mine = list(range(launch.rank, n, launch.world_size))
    count = (
        math.ceil(math.ceil(n / launch.world_size) / batch_size)
        if launch.distributed
        else math.ceil(n / batch_size)
    )
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(count)]


# --------------------------------------------------------------------------- the model


def parallel(model: nn.Module, launch: Launch) -> nn.Module:
    """The module to train: the model on its device, wrapped in DDP, or sharded with FSDP2 (each
    transformer block its own unit, then the rest with the bank and logits); a collective call."""
    model.to(launch.device)
    if not launch.distributed:
        return model
    if not launch.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [launch.device.index] if launch.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    fully_shard, mesh = _fsdp(launch)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp(launch: Launch):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise LaunchError(
            f"--fsdp needs FSDP2's fully_shard (torch >= 2.6), this is torch {torch.__version__}"
        ) from None
    return fully_shard, init_device_mesh(launch.device.type, (launch.world_size,))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``nn.ModuleList``s (a transformer's layers), in order."""
    blocks: list[nn.Module] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in lists):
            lists.append(name)
            blocks += [m for m in module if any(True for _ in m.parameters())]
    return blocks


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(module, "module", module)


# --------------------------------------------------------------------------- the launcher


def launch_workers(nproc: int, argv: Sequence[str], threads: int | None = None) -> int:
    """``torchrun --standalone --nproc-per-node nproc -m vblora <argv>`` in this process: one node,
    a local rendezvous on a free port. Returns the exit status: 0, or 2 when a worker stopped with
    its one-line message (torchrun stops the others); a worker that died otherwise is a LaunchError.

    ``threads``: OMP_NUM_THREADS of each worker when unset (default: the cores shared out).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise LaunchError(f"--nproc-per-node must be at least 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "vblora", *argv])
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the worker's own line says what went wrong
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        codes = {rank: f.exitcode for rank, f in err.failures.items()}
        if EXIT_BAD_INPUT in codes.values():
            return EXIT_BAD_INPUT
        shown = ", ".join(f"rank {r}: exit code {c}" for r, c in sorted(codes.items()))
        raise LaunchError(f"a worker process failed ({shown}); its traceback is above") from None
    except SignalException:  # Ctrl-C (or SIGTERM): torchrun has stopped every worker
        raise KeyboardInterrupt from None
    finally:
        quiet.setLevel(level)
        sys.stdout.flush()
    return 0
