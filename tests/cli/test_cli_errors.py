"""Issue 15 on the command line: every failure is one line on stderr (exit 2 for a bad input, 1 for
the system's refusal such as a full disk), with no traceback and no output or temporary left."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_cli import assets, bert_args, run  # noqa: F401 (assets is a fixture)

from vblora.formats import atomic

BAD_NUMBERS = {
    "--logits-lr nan": (["--logits-lr", "nan"], "--logits-lr must be >= 0 and finite, got nan"),
    "--head-lr inf": (["--head-lr", "inf"], "--head-lr must be >= 0 and finite, got inf"),
    "--weight-decay nan": (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite"),
    "--dropout nan": (["--dropout", "nan"], "finite"),
    "--seed too big": (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63)"),
    "--num-vectors 10**11": (["--num-vectors", "100000000000"], "more than this machine's memory"),
    "--r 10**8": (["--r", "100000000"], "more than this machine's memory"),
    "jsonl label of 5000 digits": (["--data", "{assets}/digits.jsonl"], "digits.jsonl:21: not valid JSON"),
    "deeply nested jsonl": (["--data", "{assets}/nested.jsonl"], "nested.jsonl:21: not valid JSON"),
}


@pytest.fixture(scope="module")
def bad_files(assets: Path) -> Path:  # noqa: F811
    rows = [{"text": f"good {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    lines = [json.dumps(r) for r in rows]
    (assets / "digits.jsonl").write_text("\n".join([*lines, '{"text": "x", "label": ' + "7" * 5000 + "}"]))
    (assets / "nested.jsonl").write_text(
        "\n".join([*lines, '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    )
    return assets


def one_line_error(code: int, err: str, status: int, expected: str) -> None:
    assert code == status, err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_and_data_are_one_line_errors(bad_files: Path, tmp_path: Path, case: str) -> None:
    extra, expected = BAD_NUMBERS[case]
    output = tmp_path / "out" / "run"
    code, _, err = run(*bert_args(bad_files, output), *[e.format(assets=bad_files) for e in extra])
    one_line_error(code, err, 2, expected)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_a_full_disk_during_train_is_one_line_and_leaves_nothing(
    assets: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full_disk(handle, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_all", full_disk)
    output = tmp_path / "out" / "run"
    code, _, err = run(*bert_args(assets, output), "--epochs", "1", "--max-steps", "1")
    one_line_error(code, err, 1, "No space left on device")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_inspect_of_corrupt_indices_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from conftest import MLP
    from vblora import VBLoRAConfig, get_vblora_model

    model = get_vblora_model(MLP(), VBLoRAConfig(target_modules=["lin0"], vector_length=2, num_vectors=16))
    model.save_pretrained(tmp_path, save_only_topk_weights=True)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in [k for k in tensors if k.endswith("_topk_indices")]:
        tensors[key] = torch.full_like(tensors[key].int(), 10**8)
    save_file(tensors, weights)
    code, out, err = run("inspect", tmp_path)
    one_line_error(code, err, 2, "out of range")
    assert out == ""


def test_an_output_in_a_symlink_loop_is_one_line(assets: Path, tmp_path: Path) -> None:  # noqa: F811
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    code, _, err = run(*bert_args(assets, loop / "run"))
    one_line_error(code, err, 2, "cannot be resolved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]
