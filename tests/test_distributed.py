"""Data-parallel training with PyTorch's own DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_llama
from vblora import VBLoRAConfig, get_vblora_model, optimizer_param_groups

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


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        ddp = DistributedDataParallel(make_model())
        # Each rank sees half of every batch; DDP averages the gradients.
        train(ddp, [ids.chunk(world)[rank] for ids in batches()])
        if rank == 0:
            torch.save({k: v for k, v in ddp.module.state_dict().items() if "vblora_banks" in k}, out)
    finally:
        dist.destroy_process_group()


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
