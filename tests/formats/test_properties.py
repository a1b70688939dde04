"""Property tests of the loaders (issue 15): random corruptions of safetensors headers and bodies,
JSON configs and compact headers. Every corrupted file either loads whole (an adapter that runs,
every tensor free of NaN and +inf) or raises the documented ``ValueError`` (``FormatError``) with
the model unchanged (every parameter and buffer hashed before and after), whatever the corruption.

Bounded: ``VBLORA_PROPERTY_EXAMPLES`` examples per property (30 by default, a few seconds; a
nightly run sets thousands).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MLP
from vblora import VBLoRAConfig, VBLoRAModel, get_vblora_model, load_compact, save_compact
from vblora.formats.readers import CONFIG_NAME, WEIGHTS_NAME

EXAMPLES = int(os.environ.get("VBLORA_PROPERTY_EXAMPLES", "30"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
X = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name, t in sorted(state.items()):
        h.update(name.encode() + str(t.dtype).encode() + str(t.requires_grad).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, bytes]:
    """The files of one adapter (with a saved head): full and top-k directories, a compact file."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(1)
    cfg = VBLoRAConfig(
        target_modules=["lin0", "lin1", "lin2"],
        vector_length=2,
        num_vectors=16,
        r=2,
        modules_to_save=["lin3"],
    )
    model = get_vblora_model(mlp(), cfg).eval()
    model.save_pretrained(root / "full")
    model.save_pretrained(root / "topk", save_only_topk_weights=True)
    save_compact(model, root / "a.vblora", bank_dtype=torch.int8)
    files = {
        f"{kind}/{name}": (root / kind / name).read_bytes()
        for kind in ("full", "topk")
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    }
    files["a.vblora"] = (root / "a.vblora").read_bytes()
    return files


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, body)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def check_load(load, base: torch.nn.Module, live: VBLoRAModel | None = None) -> None:
    """``load()`` gives a working adapter, or a ValueError with nothing changed."""
    watched = live if live is not None else base
    before, names = fingerprint(watched), list(live.peft_config) if live is not None else None
    try:
        model = load()
    except ValueError:
        assert fingerprint(watched) == before, "a refused load changed the model"
        if live is not None:
            assert list(live.peft_config) == names
        return
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in state.items():  # whole: nothing NaN or +inf (-inf: logits never selected)
        if t.is_floating_point():
            assert not (t.isnan().any() or t.isposinf().any()), (
                f"a load that succeeded holds NaN/inf in {name}"
            )
    with torch.no_grad():
        model.set_adapter(list(model.peft_config)[-1])
        model(X)  # it runs (finite but huge stored values may still overflow an output)


def load_directory(folder: Path, files: dict[str, bytes], kind: str, live: bool):
    folder.mkdir(exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / name).write_bytes(files[name])
    if live:
        model = VBLoRAModel(mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=2, num_vectors=8))
        check_load(lambda: (model.load_adapter(folder, "other"), model)[1], model.model, model)
    else:
        base = mlp()
        check_load(lambda: VBLoRAModel.from_pretrained(base, folder), base)


# ---------------------------------------------------------------------------- byte-level corruption
corruption = st.one_of(
    st.tuples(
        st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)
    ),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("header-flip"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    ),
)


def corrupt(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(arg * len(data))]
    (n,) = struct.unpack("<Q", data[:8])
    span = 8 + n if kind == "header-flip" else len(data)
    out = bytearray(data)
    for where, value in arg:
        out[min(int(where * span), span - 1)] = value
    return bytes(out)


@PROPERTY
@given(kind=st.sampled_from(["full", "topk"]), how=corruption, live=st.booleans())
def test_corrupt_weight_files_load_whole_or_are_refused(saved, tmp_path, kind, how, live):
    files = {n: saved[f"{kind}/{n}"] for n in (CONFIG_NAME, WEIGHTS_NAME)}
    files[WEIGHTS_NAME] = corrupt(files[WEIGHTS_NAME], how)
    load_directory(tmp_path / "x", files, kind, live)


# ---------------------------------------------------------------------------- structured header corruption
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 2, 16, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "C64", "F8_E4M3", "I32"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


@PROPERTY
@given(kind=st.sampled_from(["full", "topk"]), data=st.data())
def test_mutated_safetensors_headers_load_whole_or_are_refused(saved, tmp_path, kind, data):
    files = {n: saved[f"{kind}/{n}"] for n in (CONFIG_NAME, WEIGHTS_NAME)}
    header, body = split(files[WEIGHTS_NAME])
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = data.draw(
        json_values
        | st.lists(st.integers(-3, 2**40), max_size=4)
        | st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "C64", "F8_E4M3"])
    )
    header[key][field] = value
    files[WEIGHTS_NAME] = join(header, body)
    load_directory(tmp_path / "x", files, kind, data.draw(st.booleans()))


@PROPERTY
@given(kind=st.sampled_from(["full", "topk"]), data=st.data())
def test_mutated_configs_load_whole_or_are_refused(saved, tmp_path, kind, data):
    files = {n: saved[f"{kind}/{n}"] for n in (CONFIG_NAME, WEIGHTS_NAME)}
    config = json.loads(files[CONFIG_NAME])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(config)) | st.text(max_size=6))
        config[key] = data.draw(json_values)
    text = data.draw(
        st.sampled_from([json.dumps(config), json.dumps(config)[:-1], "[" * 5000, "\ufeff{}", ""])
    )
    files[CONFIG_NAME] = text.encode("utf-8", "surrogatepass")
    load_directory(tmp_path / "x", files, kind, data.draw(st.booleans()))


@PROPERTY
@given(data=st.data())
def test_mutated_compact_headers_load_whole_or_are_refused(saved, tmp_path, data):
    header, body = split(saved["a.vblora"])
    meta = header["__metadata__"]
    target = data.draw(st.sampled_from(["layout", "config", "index_bits", "vblora_format", "tensor"]))
    if target == "tensor":
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[key][data.draw(st.sampled_from(["dtype", "shape"]))] = data.draw(json_values)
    elif target == "layout":
        layout = json.loads(meta["layout"])
        i, j = data.draw(st.integers(0, len(layout) - 1)), data.draw(st.integers(0, 2))
        layout[i][j] = data.draw(json_values | st.sampled_from([10**400, -20, 0, 2**31, 40]))
        meta["layout"] = json.dumps(layout)
    elif target == "config":
        config = json.loads(meta["config"])
        config[data.draw(st.sampled_from(sorted(config)))] = data.draw(json_values)
        meta["config"] = json.dumps(config)
    else:
        meta[target] = data.draw(st.text(max_size=6) | st.sampled_from(["4", "5", "0", "9" * 5000]))
    path = tmp_path / "a.vblora"
    try:
        path.write_bytes(join(header, body))
    except (TypeError, ValueError):  # a value json cannot write
        return
    base = mlp()
    check_load(lambda: load_compact(base, path), base)
    live = VBLoRAModel(mlp(), VBLoRAConfig(target_modules=["lin0"], vector_length=2, num_vectors=8))
    check_load(lambda: load_compact(live, path, "other"), live.model, live)
