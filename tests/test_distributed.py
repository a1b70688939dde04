"""Data-parallel training with PyTorch's own engines: DistributedDataParallel and FSDP2's
``fully_shard`` (gloo, 2 CPU processes)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_llama
from vblora import VBLoRAConfig, VBLoRAModel, get_vblora_model, optimizer_param_groups

CFG = VBLoRAConfig(num_vectors=16, vector_length=16, target_modules="all-linear")
STEPS = 3


def make_model():
    return get_vblora_model(tiny_llama(seed=0), CFG)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (4, 8), generator=g) for _ in range(STEPS)]


def train(model, step_batches) -> None:
    opt = torch.optim.AdamW(optimizer_param_groups(model.module if hasattr(model, "module") else model))
    for ids in step_batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A spawned worker's gloo group on one thread, seeded like the single process it is compared with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        yield
        dist.barrier()  # both ranks done before the pairs close: gloo aborts a rank torn down mid-use
    finally:
        dist.destroy_process_group()


def worker(rank: int, world: int, port: int, out: str) -> None:
    with process_group(rank, world, port):
        ddp = DistributedDataParallel(make_model())
        # Each rank sees half of every batch; DDP averages the gradients.
        train(ddp, [ids.chunk(world)[rank] for ids in batches()])
        if rank == 0:
            torch.save({k: v for k, v in ddp.module.state_dict().items() if "vblora_banks" in k}, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path) -> None:
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    torch.manual_seed(1)
    single = make_model()
    train(single, batches())  # full batches: mean loss over 4 rows = mean of the two half-batch means
    ddp_state = torch.load(out, weights_only=True)
    for key, value in ddp_state.items():
        torch.testing.assert_close(value, single.state_dict()[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(ddp_state["vblora_banks.default.logits"], make_model().vblora_banks.default.logits)


# ---------------------------------------------------------------------- FSDP2 (fully_shard)
PROBE = torch.arange(16).reshape(2, 8)


def train_and_probe(model, step_batches) -> torch.Tensor:
    """Train on each batch; after every step, the no-grad logits of a fixed probe in eval mode."""
    opt = torch.optim.AdamW(optimizer_param_groups(model))
    probes = []
    for ids in step_batches:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            probes.append(model(input_ids=PROBE).logits)
    return torch.stack(probes)


def fsdp_worker(rank: int, world: int, port: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with process_group(rank, world, port):
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        assert callable(getattr(model.vblora_banks["default"].bank, "full_tensor", None))  # sharded
        probes = train_and_probe(model, [ids.chunk(world)[rank] for ids in batches()])
        model.save_pretrained(folder, save_only_topk_weights=False)  # every rank; rank 0 writes
        if rank == 0:
            torch.save(probes, os.path.join(folder, "probes.pt"))


def test_fsdp2_fully_shard_trains_evaluates_and_saves_like_one_process(tmp_path) -> None:
    """Sharded bank and logits: the same parameters, the same eval outputs after every step (the
    composed-factor cache sees FSDP's updates) and a saved adapter equal to one process's."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no public fully_shard (torch >= 2.6)")
    folder = tmp_path / "adapter"
    mp.spawn(fsdp_worker, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    torch.manual_seed(1)
    single = make_model()
    want = train_and_probe(single, batches())
    got = torch.load(folder / "probes.pt", weights_only=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want[0], want[-1])  # the probes did change with training
    loaded = VBLoRAModel.from_pretrained(tiny_llama(seed=0), folder, is_trainable=True)
    for key in ("bank", "logits"):
        got = getattr(loaded.vblora_banks["default"], key)
        torch.testing.assert_close(got, getattr(single.vblora_banks["default"], key), atol=1e-6, rtol=1e-5)


def test_trainer_refuses_to_save_a_sharded_model(tmp_path) -> None:
    """Trainer saves from the main process alone: gathering there would hang, so it is refused."""
    pytest.importorskip("transformers")
    from torch.distributed import fsdp
    from transformers import TrainingArguments

    from vblora.hf import VBLoRATrainer

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no public fully_shard (torch >= 2.6)")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = make_model()
        fsdp.fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
        trainer = VBLoRATrainer(model, args)
        with pytest.raises(RuntimeError, match="sharded"):
            trainer._save(str(tmp_path / "checkpoint"))
        assert not (tmp_path / "checkpoint").exists()  # nothing written, not even the folder
    finally:
        dist.destroy_process_group()
