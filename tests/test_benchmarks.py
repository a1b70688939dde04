"""The accuracy benchmark's bookkeeping (no training): the seed-for-seed gaps to the best LoRA, the
goal's verdict, and combining the JSON files of separate runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

import pytest
import torch

from conftest import tiny_bert
from vblora import VBLoRAModel
from vblora.training.loop import RunSettings

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy() -> Any:
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method: str, seed: int, accuracy: float, stored: int, **compact: tuple[int, float]) -> dict:
    return {
        "method": method,
        "seed": seed,
        "accuracy": accuracy,
        "stored_bytes": stored,
        "train_seconds": 1.0,
        "compact": {bank: {"bytes": b, "accuracy": a} for bank, (b, a) in compact.items()},
    }


def test_gaps_are_paired_by_seed_against_the_best_lora(accuracy: Any) -> None:
    rows = [
        row("lora-all (lr 0.001)", 1, 0.812, 100_000),
        row("lora-all (lr 0.001)", 2, 0.806, 100_000),
        row("lora-qv (lr 0.002)", 1, 0.800, 20_000),
        row("lora-qv (lr 0.002)", 2, 0.805, 20_000),  # mean 0.8025 < 0.809: not the best
        row("vblora (h=64, r=8)", 1, 0.805, 4_000, int8=(1_000, 0.804)),
        row("vblora (h=64, r=8)", 2, 0.797, 4_000, int8=(1_000, 0.797)),
        row("vblora (h=64, r=8)", 3, 0.700, 4_000),  # no LoRA ran seed 3: not paired
        row("vblora (h=12, r=4)", 1, 0.790, 6_000),
        row("peft-vblora (h=64, r=8)", 1, 0.803, 4_000),  # PEFT's own VB-LoRA gets its gap too
        row("peft-vblora (h=64, r=8)", 2, 0.799, 4_000),
        row("head-only", 1, 0.62, 0),
        row("head-only", 2, 0.63, 0),
    ]
    gaps = {(g["method"], g["form"]): g for g in accuracy.paired_gaps(rows)}
    directory = gaps[("vblora (h=64, r=8)", "top-k directory")]
    assert directory["best_lora"] == "lora-all (lr 0.001)" and directory["seeds"] == 2
    # gaps 0.7 and 0.9 points: mean 0.8, standard error 0.1
    assert directory["gap_points"] == pytest.approx(0.8)
    assert directory["gap_se"] == pytest.approx(0.1)
    assert directory["bytes_share"] == pytest.approx(0.04) and directory["goal_met"]
    int8 = gaps[("vblora (h=64, r=8)", "compact, int8 bank")]
    assert int8["gap_points"] == pytest.approx(0.85) and int8["bytes_share"] == pytest.approx(0.01)
    assert gaps[("peft-vblora (h=64, r=8)", "top-k directory")]["gap_points"] == pytest.approx(0.8)
    assert not any(method == "head-only" for method, _ in gaps)
    small = gaps[("vblora (h=12, r=4)", "top-k directory")]  # 2.2 points behind, one seed
    assert small["seeds"] == 1 and small["gap_se"] is None and not small["goal_met"]
    text = accuracy.gap_table(list(gaps.values()))
    assert "| vblora (h=64, r=8) | top-k directory | 0.80 ± 0.10 points | 2 | 4.0% | met |" in text
    assert "| vblora (h=12, r=4) | top-k directory | 2.20 points | 1 | 6.0% | not met |" in text


def test_the_goal_needs_both_the_accuracy_and_the_bytes(accuracy: Any) -> None:
    lora = [row("lora-all (lr 0.001)", s, 0.81, 100_000) for s in (1, 2)]
    close_but_big = [row("vblora (h=128, r=8)", s, 0.805, 6_000) for s in (1, 2)]
    small_but_far = [row("vblora (h=64, r=8)", s, 0.799, 4_000) for s in (1, 2)]
    verdicts = {
        g["method"]: g["goal_met"] for g in accuracy.paired_gaps(lora + close_but_big + small_but_far)
    }
    assert verdicts == {"vblora (h=128, r=8)": False, "vblora (h=64, r=8)": False}
    assert accuracy.paired_gaps(close_but_big) == []  # no LoRA, nothing to compare with


def write_run(path: pathlib.Path, rows: list[dict], **settings: Any) -> pathlib.Path:
    base = {"model": None, "data": "rotten-tomatoes", "train_size": 4000, "test_size": 5000, "r": 4}
    path.write_text(json.dumps({"rows": rows, "setup": {"settings": {**base, **settings}}}))
    return path


def test_combine_merges_runs_and_refuses_a_different_split(accuracy: Any, tmp_path: pathlib.Path) -> None:
    a = write_run(tmp_path / "a.json", [row("lora-all (lr 0.001)", 1, 0.81, 100_000)])
    b = write_run(tmp_path / "b.json", [row("vblora (h=64)", 1, 0.80, 4_000)], r=8)  # an older name
    c = write_run(tmp_path / "c.json", [row("lora-all (lr 0.001)", 2, 0.82, 100_000)])
    rows = accuracy.combine([a, b, c])
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("lora-all (lr 0.001)", 1),
        ("lora-all (lr 0.001)", 2),
        ("vblora (h=64, r=8)", 1),
    ]
    other = write_run(tmp_path / "d.json", [row("lora-qv (lr 0.002)", 1, 0.8, 20_000)], test_size=1000)
    with pytest.raises(SystemExit, match=r"d\.json: a different split or budget \(test_size\)"):
        accuracy.combine([a, other])
    (tmp_path / "junk.json").write_text("[1, 2]")
    for path in (tmp_path / "junk.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match=f"{path.name}: not a --json file of this benchmark"):
            accuracy.combine([a, path])


def test_setting_casts_to_the_field_type(accuracy: Any) -> None:
    assert accuracy.setting("r=8") == {"r": 8}
    assert accuracy.setting("bank_lr=2e-2") == {"bank_lr": 0.02}
    assert accuracy.setting("test_size=5000") == {"test_size": 5000}  # a count, not a fraction
    for bad, message in (("nope=1", "RunSettings field"), ("r=x", "not a valid"), ("r=", "FIELD=VALUE")):
        with pytest.raises(ValueError, match=message):
            accuracy.setting(bad)


def test_peft_vblora_is_built_with_our_recipe(accuracy: Any, tmp_path: pathlib.Path) -> None:
    """The peft-vblora method: PEFT's VB-LoRA with the settings' config and learning-rate groups,
    saving a top-k directory our library loads with the same outputs."""
    s = dataclasses.replace(RunSettings().resolved(), vector_length=64, num_vectors=8, r=2, head_lr=3e-3)
    model, optimizer, save = accuracy.build_peft_vblora(tiny_bert(), s)
    groups = [(g["lr"], sorted(id(p) for p in g["params"])) for g in optimizer.param_groups]
    named = dict(model.named_parameters())
    logits = sorted(id(p) for n, p in named.items() if "vblora_logits" in n)
    assert len(logits) == 2 * 6 * 2 + 2  # A and B of q, k, v and three dense layers per block; pooler
    assert groups[0] == (s.logits_lr, logits)
    assert groups[1] == (s.bank_lr, [id(named[n]) for n in named if "vblora_vector_bank" in n])
    assert groups[2][0] == 3e-3 and len(groups[2][1]) == 2  # the classifier's weight and bias
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p.data, std=0.5)  # trained-looking logits, bank and head
    stored, _ = save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_only_topk_weights"]
    assert stored > 0
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = VBLoRAModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
