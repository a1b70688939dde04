"""Saving processes to kill, for tests/formats/test_atomic.py (run as a script, not collected).

``python saver.py MODE TARGET ROUNDS SEED`` prints one JSON object: for each kill, which whole
version the target held afterwards (or the error loading it). Runs single-threaded, so that it can
fork savers safely; the test then checks the folder itself.

Modes: ``random`` (SIGKILL a saver looping over both versions at random moments), ``steps``
(SIGKILL a save at its 1st, 2nd, ... atomic step until one completes) and ``race`` (two savers
publish to one folder at the same moment); ``all`` runs the three in ``TARGET/<mode>/``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import json
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import MLP  # noqa: E402
from vblora import VBLoRAConfig, VBLoRAModel, get_vblora_model  # noqa: E402
from vblora.formats import atomic  # noqa: E402

X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
STEPS = ("write_all", "fsync_dir", "rename2", "remove_leftovers")


def build() -> tuple[dict[str, VBLoRAModel], dict[str, torch.Tensor]]:
    """Two versions of an adapter that a mix of files cannot pass for: ``full`` (r=4, full logits)
    and ``topk`` (r=2, top-k only), and their outputs."""
    models, outputs = {}, {}
    for version, r in (("full", 4), ("topk", 2)):
        torch.manual_seed(0)
        base = MLP()  # as version_of builds it
        torch.manual_seed(r)
        cfg = VBLoRAConfig(
            target_modules=["lin0", "lin1", "lin2"],
            vector_length=2,
            num_vectors=64,
            r=r,
            save_only_topk_weights=version == "topk",
        )
        models[version] = get_vblora_model(base, cfg).eval()
        outputs[version] = models[version](X).detach()
    return models, outputs


def save(models: dict[str, VBLoRAModel], target: Path, version: str) -> None:
    models[version].save_pretrained(target)


def version_of(target: Path, outputs: dict[str, torch.Tensor]) -> str:
    try:
        torch.manual_seed(0)
        out = VBLoRAModel.from_pretrained(MLP(), target)(X)
    except Exception as err:
        return f"unloadable: {err}"
    matches = [v for v, want in outputs.items() if torch.allclose(out, want, rtol=1e-5, atol=1e-6)]
    return matches[0] if len(matches) == 1 else "a mix of two saves"


def fork(work) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return pid


def kill_at(step: int) -> None:
    """SIGKILL this process at the ``step``-th call of an atomic step (or of os.replace/rename)."""
    calls = [0]
    for owner, name in [(atomic, n) for n in STEPS] + [(os, "replace"), (os, "rename")]:
        real = getattr(owner, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(owner, name, counted)


def main(mode: str, target: Path, rounds: int, seed: int) -> dict[str, object]:
    if mode == "all":  # one process for every mode: the imports are paid once
        modes = {"random": rounds, "steps": 60, "race": 6}
        return {m: main(m, target / m / "adapter", n, seed) for m, n in modes.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    model, outputs = build()  # model: both versions' models
    rng = random.Random(seed)
    seen: list[str] = []
    if mode == "race":
        for i in range(rounds):
            folder = target.parent / f"adapter{i}"
            start = time.time() + 0.05
            pids = [
                fork(
                    lambda v=v, f=folder, t=start: (time.sleep(max(0.0, t - time.time())), save(model, f, v))
                )
                for v in ("full", "topk")
            ]
            codes = [os.waitpid(pid, 0)[1] for pid in pids]
            seen.append(version_of(folder, outputs) if codes == [0, 0] else f"saver failed: {codes}")
        return {"seen": seen}
    save(model, target, "full")
    (target / "notes.txt").write_text("mine")  # not the adapter's: every save carries it over
    for step in range(1, rounds + 1):
        if mode == "random":

            def forever() -> None:
                while True:
                    for v in ("full", "topk"):
                        save(model, target, v)

            pid = fork(forever)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        else:
            save(model, target, "full")
            pid = fork(lambda step=step: (kill_at(step), save(model, target, "topk")))
            status = os.waitpid(pid, 0)[1]
        seen.append(version_of(target, outputs))
        if (target / "notes.txt").read_text() != "mine":
            seen.append("notes.txt lost")
        if mode == "steps" and status == 0:  # the save completed before this step
            break
    left = sorted(p.name for p in target.parent.iterdir() if p.name.endswith((".tmp", ".partial")))
    save(model, target, "full")
    return {"seen": seen, "left_by_kills": left, "final": version_of(target, outputs)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
