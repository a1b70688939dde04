"""Atomic publishing (vblora.formats.atomic): a save killed at any moment leaves the complete old
adapter or the complete new one, concurrent saves end with one of them whole, and the leftovers of
killed saves are removed by the next save to the same place.

The kill tests fork a saving process and SIGKILL it: at random moments (``VBLORA_KILL_ROUNDS``
rounds, 8 by default; a nightly run sets more) and at every step of a save in turn; the forking
and killing happens in ``saver.py``, a single-threaded process (forking a multi-threaded torch
process can deadlock the child).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MLP
from vblora import VBLoRAConfig, VBLoRAModel, export_lora, get_vblora_model, save_compact
from vblora.formats import atomic
from vblora.formats.readers import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.skipif(atomic._LIBC is None, reason="needs Linux renameat2")
X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


def adapters() -> tuple[VBLoRAModel, dict[str, torch.Tensor]]:
    """A model and the outputs of its two versions: ``full`` (full logits) and ``topk`` (bank x 2)."""
    torch.manual_seed(0)
    cfg = VBLoRAConfig(target_modules=["lin0", "lin1", "lin2"], vector_length=2, num_vectors=64, r=4)
    model = get_vblora_model(MLP(), cfg).eval()
    outputs = {"full": model(X).detach()}
    with torch.no_grad():
        model.vblora_banks["default"].bank.mul_(2.0)
    outputs["topk"] = model(X).detach()
    with torch.no_grad():
        model.vblora_banks["default"].bank.div_(2.0)
    return model, outputs


def save_version(model: VBLoRAModel, target: Path, version: str) -> None:
    bank = model.vblora_banks["default"].bank
    with torch.no_grad():
        bank.mul_(2.0 if version == "topk" else 1.0)
        model.save_pretrained(target, save_only_topk_weights=version == "topk")
        bank.div_(2.0 if version == "topk" else 1.0)


def loaded_version(target: Path, outputs: dict[str, torch.Tensor]) -> str:
    """Which whole version ``target`` holds; fails if it does not load or matches neither."""
    torch.manual_seed(0)
    out = VBLoRAModel.from_pretrained(MLP(), target)(X)
    matches = [v for v, want in outputs.items() if torch.allclose(out, want, rtol=1e-5, atol=1e-6)]
    assert len(matches) == 1, "the saved adapter is a mix of two saves"
    return matches[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, dict]:
    """Run tests/formats/saver.py: single-threaded, so it may fork savers and SIGKILL them."""
    root = tmp_path_factory.mktemp("killed")
    rounds = os.environ.get("VBLORA_KILL_ROUNDS", "8")
    script = Path(__file__).with_name("saver.py")
    done = subprocess.run(
        [sys.executable, str(script), "all", str(root), rounds, "0"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout.splitlines()[-1])


def test_random_kills_leave_a_whole_adapter(killed):
    root, results = killed
    result = results["random"]
    assert set(result["seen"]) <= {"full", "topk"}, result["seen"]
    assert result["final"] == "full"
    assert leftovers(root / "random") == [] and leftovers(root / "random" / "adapter") == []


def test_a_kill_at_every_step_of_a_save_leaves_old_or_new(killed):
    root, results = killed
    seen = results["steps"]["seen"]
    assert seen[-1] == "topk", seen  # the last round's save completed
    assert set(seen) == {"full", "topk"} and seen.index("topk") == len(seen) - seen.count("topk"), seen
    assert leftovers(root / "steps") == [] and leftovers(root / "steps" / "adapter") == []


def test_concurrent_saves_end_with_one_whole_adapter(killed):
    root, results = killed
    seen = results["race"]["seen"]
    assert len(seen) == 6 and set(seen) <= {"full", "topk"}, seen
    for folder in (root / "race").iterdir():
        assert leftovers(folder) == []
    assert leftovers(root / "race") == []


def test_other_adapters_and_files_in_the_folder_are_kept(tmp_path):
    model, outputs = adapters()
    model.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "other").mkdir()
    (tmp_path / "out" / "other" / "keep.bin").write_bytes(b"x")
    os.symlink("other", tmp_path / "out" / "link")
    save_version(model, tmp_path / "out", "topk")
    assert (tmp_path / "out" / "other" / "keep.bin").read_bytes() == b"x"
    assert os.readlink(tmp_path / "out" / "link") == "other"
    assert loaded_version(tmp_path / "out", outputs) == "topk"


def test_a_symlinked_target_keeps_its_link(tmp_path):
    model, outputs = adapters()
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    save_version(model, tmp_path / "link", "topk")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / CONFIG_NAME).is_file()
    assert loaded_version(tmp_path / "link", outputs) == "topk"


def test_saving_from_inside_the_target_folder(tmp_path, monkeypatch):
    model, outputs = adapters()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    save_version(model, Path("."), "full")
    save_version(model, Path("."), "topk")
    assert Path.cwd() == tmp_path / "out" and Path(CONFIG_NAME).is_file()
    assert loaded_version(tmp_path / "out", outputs) == "topk"


def test_bad_targets_are_value_errors_and_leave_nothing(tmp_path):
    model, _ = adapters()
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(ValueError, match="symbolic link loop"):
        model.save_pretrained(tmp_path / "loop")
    with pytest.raises(ValueError, match="longer than a file system allows"):
        model.save_pretrained(tmp_path / ("x" * 300))
    with pytest.raises(ValueError, match="longer than a file system allows"):
        save_compact(model, tmp_path / "new" / ("x" * 300 + ".vblora"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_a_full_disk_leaves_the_old_adapter_and_no_new_folders(tmp_path, monkeypatch):
    model, outputs = adapters()
    save_version(model, tmp_path / "old", "full")

    def full_disk(handle, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_all", full_disk)
    writes = [
        lambda: save_version(model, tmp_path / "old", "topk"),
        lambda: save_version(model, tmp_path / "new" / "nested" / "adapter", "topk"),
        lambda: export_lora(model, tmp_path / "new" / "lora"),
        lambda: save_compact(model, tmp_path / "new" / "deep" / "a.vblora"),
    ]
    for write in writes:
        with pytest.raises(OSError, match="No space left"):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    names = {p.name for p in (tmp_path / "old").iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= names and leftovers(tmp_path / "old") == []
    assert loaded_version(tmp_path / "old", outputs) == "full"


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    """remove_leftovers only takes temporaries whose writer is gone (their lock is free)."""
    target = tmp_path / "a.vblora"
    with atomic._temp_file(target) as (live, _):
        dead = tmp_path / ".a.vblora.dead.tmp"
        dead.write_bytes(b"left by a killed save")
        atomic.remove_leftovers(tmp_path, target)
        assert live.exists() and not dead.exists()


def test_published_run_folders_replace_whole(tmp_path):
    target = tmp_path / "run"
    for content in ("one", "two"):
        with atomic.staging_folder(target) as staged:
            (staged / "f").write_text(content)
            assert atomic.publish_folder(staged, target, replace=True)
        assert (target / "f").read_text() == content
    with atomic.staging_folder(target) as staged:
        assert not atomic.publish_folder(staged, target, replace=False)
    assert (target / "f").read_text() == "two" and leftovers(tmp_path) == []
