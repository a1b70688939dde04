"""Tests for the checkpoint formats (vblora.formats, .checkpoints, .files): PEFT interchange (both
directions), top-k, compact files, LoRA export, atomic writes and validation. Expected outputs come
from ``peft`` itself or from the source model."""

from __future__ import annotations

import copy
import json
import math
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vblora import VBLoRAConfig, VBLoRAModel, export_lora, get_vblora_model, load_compact, save_compact  # noqa: E402
from vblora.core.bank import AdapterBank  # noqa: E402
from vblora.formats import atomic, compact, readers  # noqa: E402
from vblora.formats.readers import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

H, B, R, K = 12, 16, 2, 2  # num_vectors, vector_length, rank, topk of the tiny adapters


# ---------------------------------------------------------------------------- tiny models
def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=32,
    )
    return transformers.BertForSequenceClassification(cfg)


MODELS: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "llama": (
        _llama,
        dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=["lm_head"],
        ),
    ),
    "gpt2": (
        _gpt2,
        dict(target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"], fan_in_fan_out=True),
    ),
    "bert": (_bert, dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"])),
}
ADAPTER = dict(
    r=R,
    num_vectors=H,
    vector_length=B,
    topk=K,
    bias="vblora_only",
    init_vector_bank_bound=0.5,
    init_logits_std=1.0,
)


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: factory().eval() for name, (factory, _) in MODELS.items()}


INPUT_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _ours(base: nn.Module, name: str, **overrides) -> VBLoRAModel:
    torch.manual_seed(2)
    model = get_vblora_model(copy.deepcopy(base), VBLoRAConfig(**{**ADAPTER, **MODELS[name][1], **overrides}))
    _perturb(model)
    return model.eval()


def _theirs(base: nn.Module, name: str, **overrides) -> nn.Module:
    torch.manual_seed(3)
    config = peft.VBLoRAConfig(**{**ADAPTER, **MODELS[name][1], **overrides})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    _perturb(model)
    return model.eval()


def _perturb(model: nn.Module) -> None:
    """Move trained biases and modules_to_save copies away from the base, so their loading is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "vblora" not in name:
                p.add_(0.3 * torch.randn_like(p))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _keys(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(path / WEIGHTS_NAME).items()}


# ---------------------------------------------------------------------------- interchange with peft
@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
@pytest.mark.parametrize("name", list(MODELS))
def test_ours_to_peft(bases, tmp_path, name, topk):
    ours = _ours(bases[name], name)
    ref = _out(ours)
    bank = ours.vblora_banks["default"].bank
    with torch.no_grad():
        kept = bank.clone()
        bank.zero_()  # without the VB-LoRA update (head copy and biases kept) the output differs
        assert _rel(_out(ours), ref) > 1e-2
        bank.copy_(kept)
    ours.save_pretrained(tmp_path / "ours", save_only_topk_weights=topk)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases[name]), tmp_path / "ours").eval()
    assert _rel(_out(theirs), ref) <= 1e-6
    # Same keys, shapes and dtypes as a directory that peft writes for the same config.
    _theirs(bases[name], name, save_only_topk_weights=topk).save_pretrained(tmp_path / "peft")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")


@pytest.mark.parametrize("topk", [False, True], ids=["full", "topk"])
@pytest.mark.parametrize("name", list(MODELS))
def test_peft_to_ours(bases, tmp_path, name, topk):
    theirs = _theirs(bases[name], name, save_only_topk_weights=topk)
    ref = _out(theirs)
    theirs.save_pretrained(tmp_path)
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(bases[name]), tmp_path)
    assert _rel(_out(ours), ref) <= 1e-6
    assert ours.vblora_banks["default"].inference_only == topk
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


def test_saved_config_is_peft_config(bases, tmp_path):
    ours = _ours(bases["gpt2"], "gpt2", save_only_topk_weights=True)
    ours.save_pretrained(tmp_path, save_only_topk_weights=False)  # the argument overrides the config
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["peft_type"] == "VBLORA" and data["save_only_topk_weights"] is False
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, peft.VBLoRAConfig)
    assert (loaded.r, loaded.num_vectors, loaded.vector_length, loaded.topk) == (R, H, B, K)
    assert loaded.fan_in_fan_out and loaded.bias == "vblora_only" and "ln_f" in loaded.modules_to_save
    assert all(not k.endswith("_topk_indices") for k in _keys(tmp_path))


@pytest.mark.parametrize(("h", "k", "dtype"), [(12, 2, torch.uint8), (300, 3, torch.int16)])
def test_topk_keys_follow_peft_dtype_rule(tmp_path, h, k, dtype):
    model = get_vblora_model(
        nn.Sequential(nn.Linear(8, 16)),
        VBLoRAConfig(r=2, num_vectors=h, vector_length=4, topk=k, target_modules=["0"]),
    )
    model.save_pretrained(tmp_path, save_only_topk_weights=True)
    keys = _keys(tmp_path)
    assert keys["base_model.model.0.vblora_logits_A_topk_indices"] == ((2, 2, k), dtype)
    assert keys["base_model.model.0.vblora_logits_B_topk_weights"] == ((4, 2, k - 1), torch.float32)
    assert keys[readers.BANK_KEY] == ((h, 4), torch.float32)


def test_multiple_adapters_use_peft_layout(bases, tmp_path):
    ours = _ours(bases["bert"], "bert")
    ours.add_adapter(
        "other",
        VBLoRAConfig(
            r=2,
            num_vectors=H,
            vector_length=B,
            target_modules=["key"],
            init_vector_bank_bound=0.5,
            init_logits_std=1.0,
        ),
    )
    outputs = {}
    for adapter in ("default", "other"):
        ours.set_adapter(adapter)
        outputs[adapter] = _out(ours)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    again = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)
    again.load_adapter(tmp_path / "other", "other")
    for adapter, ref in outputs.items():
        theirs.set_adapter(adapter)
        again.set_adapter(adapter)
        assert _rel(_out(theirs.eval()), ref) <= 1e-6 and _rel(_out(again.eval()), ref) <= 1e-6
    ours.save_pretrained(tmp_path / "only", adapter_name="other")
    # PEFT's layout: the model card at the top, the adapter in its folder
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["README.md", "other"]


def test_peft_multi_adapter_directory_loads(bases, tmp_path):
    theirs = _theirs(bases["bert"], "bert")
    other = dict(ADAPTER, bias="none", target_modules=["key"])
    theirs.add_adapter("other", peft.VBLoRAConfig(**other, save_only_topk_weights=True))
    outputs = {}
    for adapter in ("default", "other"):
        theirs.set_adapter(adapter)
        outputs[adapter] = _out(theirs.eval())
    # PEFT also writes the biases of the other adapter's layers into the default adapter's file.
    theirs.save_pretrained(tmp_path)
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    for adapter, ref in outputs.items():
        ours.set_adapter(adapter)
        # fp32 rounding: PEFT sums the top-k admixture in another order (1.1e-6 seen on this CPU)
        assert _rel(_out(ours), ref) <= 1e-5


# ---------------------------------------------------------------------------- training and top-k
def test_full_checkpoint_resumes_training_exactly(bases, tmp_path):
    labels = torch.tensor([0, 1])

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        loss = model(input_ids=INPUT_IDS, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    ours = _ours(bases["bert"], "bert").train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        step(ours, opt)
    ours.save_pretrained(tmp_path)
    resumed = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path, is_trainable=True).train()
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 + 2 + 2 * 5 + 1  # bank, logits, classifier copy, biases of 5/layer + pooler
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, resumed)]
    for _ in range(2):
        assert step(ours, opts[0]) == step(resumed, opts[1])


def test_inference_loads_stay_frozen_when_activated(bases, tmp_path):
    _ours(bases["bert"], "bert", bias="none").save_pretrained(tmp_path)

    def trainable(model: VBLoRAModel) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    model = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)  # full logits
    model.load_adapter(tmp_path, "b")  # loading another adapter does not unfreeze the active one
    assert trainable(model) == set()
    model.set_adapter("b")  # nor does activating one loaded for inference (PEFT's would train it)
    assert trainable(model) == set()
    model.load_adapter(tmp_path, "c", is_trainable=True)
    assert trainable(model) == set()  # inactive until set_adapter
    model.set_adapter("c")
    copy_ = "model.classifier.modules_to_save.c"
    assert trainable(model) == {
        "vblora_banks.c.bank", "vblora_banks.c.logits", f"{copy_}.weight", f"{copy_}.bias"
    }  # fmt: skip
    model.set_adapter("default")
    assert trainable(model) == set()


def _snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return repr(model), state, flags, model.training


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = _snapshot(model)
    assert after[0] == before[0] and after[2:] == before[2:]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_training_a_topk_checkpoint_is_refused_at_load_time(bases, tmp_path):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path / "topk", save_only_topk_weights=True)
    base = copy.deepcopy(bases["bert"])
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"top-k checkpoint.*cannot be trained"):
        VBLoRAModel.from_pretrained(base, tmp_path / "topk", is_trainable=True)
    _assert_unchanged(base, before)
    host = _ours(bases["bert"], "bert", bias="none")  # only one adapter may train biases
    before = _snapshot(host)
    with pytest.raises(ValueError, match="is_trainable=False"):
        host.load_adapter(tmp_path / "topk", "b", is_trainable=True)
    _assert_unchanged(host, before)
    # Re-saved in full, a top-k adapter keeps its -inf logits: still inference only.
    loaded = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / "topk")
    loaded.save_pretrained(tmp_path / "full", save_only_topk_weights=False)
    with pytest.raises(ValueError, match="cannot be trained"):
        VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / "full", is_trainable=True)
    host.load_adapter(tmp_path / "topk", "b")  # inference load works, and stays frozen when activated
    host.set_adapter("b")
    assert not host.vblora_banks["b"].bank.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_topk_weights_load(bases, tmp_path, dtype):
    ours = _ours(bases["llama"], "llama")
    ref = _out(ours)
    ours.save_pretrained(tmp_path, save_only_topk_weights=True)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors = {k: v.to(dtype) if k.endswith("_topk_weights") else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    loaded = VBLoRAModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path)
    assert 0 < _rel(_out(loaded), ref) <= 1e-2


def test_a_half_precision_model_saves_topk_weights_peft_can_load(bases, tmp_path):
    ours = _ours(bases["llama"], "llama").to(torch.bfloat16)  # the whole model cast, adapter too
    ours.save_pretrained(tmp_path, save_only_topk_weights=True)
    weights = [v.dtype for k, v in load_file(tmp_path / WEIGHTS_NAME).items() if k.endswith("_topk_weights")]
    assert weights and set(weights) == {torch.float32}  # PEFT scatters them into an fp32 table
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]).to(torch.bfloat16), tmp_path)
    assert _rel(_out(theirs.eval()).float(), _out(ours).float()) <= 1e-2


def test_merge_after_topk_load(bases, tmp_path):
    ours = _ours(bases["gpt2"], "gpt2")
    ref = _out(ours)
    ours.save_pretrained(tmp_path, save_only_topk_weights=True)
    merged = VBLoRAModel.from_pretrained(copy.deepcopy(bases["gpt2"]), tmp_path).merge_and_unload()
    assert _rel(_out(merged), ref) <= 1e-5


def test_an_inference_only_adapter_keeps_its_selection_not_the_logits_table(bases, tmp_path):
    """A top-k directory or a compact file is served from (P, k) indices and weights; the (P, h)
    logits are not kept (at h = 2048 they are 8 KB a sub-vector). Everything still works from it:
    outputs, merging, export to LoRA, re-saving in either form, and PEFT reads what it re-saves."""
    ours = _ours(bases["bert"], "bert")
    ref, trained = _out(ours), ours.vblora_banks["default"]
    ours.save_pretrained(tmp_path / "topk", save_only_topk_weights=True)
    save_compact(ours, tmp_path / "a.vblora", bank_dtype=torch.float32)
    for served, tol in (
        (VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / "topk"), 1e-6),
        (load_compact(copy.deepcopy(bases["bert"]), tmp_path / "a.vblora"), 2e-3),  # fp16 weights
    ):
        bank = served.vblora_banks["default"]
        assert bank.logits.numel() == 0 and bank.inference_only
        assert bank.topk_indices.shape == (trained.num_subvectors, trained.topk)
        assert bank.selection()[1].shape == (trained.num_subvectors, trained.topk)
        # both files store k-1 weights (the k-th is 1 - their sum): the bank keeps them so
        assert bank.topk_weights.shape == (trained.num_subvectors, trained.topk - 1)
        assert bank.num_subvectors == trained.num_subvectors
        want, _ = trained.selection()
        assert torch.equal(bank.topk_indices.long().sort(-1).values, want.long().sort(-1).values)
        assert _rel(_out(served), ref) <= tol
    ref = _out(served)  # the compact file's adapter, from here on
    for topk in (True, False):  # re-saved either way, it serves the same, in ours and in PEFT
        served.save_pretrained(tmp_path / f"again-{topk}", save_only_topk_weights=topk)
        again = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / f"again-{topk}")
        assert _rel(_out(again), ref) <= 1e-5 and again.vblora_banks["default"].logits.numel() == 0
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / f"again-{topk}")
        assert _rel(_out(theirs.eval()), ref) <= 1e-5
    export_lora(served, tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / "lora").eval()
    assert _rel(_out(lora), ref) <= 1e-5
    assert _rel(_out(served.merge_and_unload()), ref) <= 1e-5


def test_a_directory_mixing_full_and_topk_modules_loads_as_inference_only(bases, tmp_path):
    ours = _ours(bases["bert"], "bert")
    ref = _out(ours)
    ours.save_pretrained(tmp_path / "full", save_only_topk_weights=False)
    ours.save_pretrained(tmp_path / "mixed", save_only_topk_weights=True)
    full = load_file(tmp_path / "full" / WEIGHTS_NAME)
    mixed = load_file(tmp_path / "mixed" / WEIGHTS_NAME)
    key = next(k for k in full if k.endswith("vblora_logits_A"))  # one factor of one module in full
    del mixed[key + "_topk_indices"], mixed[key + "_topk_weights"]
    save_file({**mixed, key: full[key]}, tmp_path / "mixed" / WEIGHTS_NAME)
    served = VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path / "mixed")
    bank = served.vblora_banks["default"]
    assert bank.inference_only and bank.logits.numel() == 0
    assert _rel(_out(served), ref) <= 1e-6


def test_missing_biases_of_old_peft_files_warn(bases, tmp_path):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path)
    tensors = {
        k: v for k, v in load_file(tmp_path / WEIGHTS_NAME).items() if not k.endswith("base_layer.bias")
    }
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match="PEFT <= 0.20 did not save them"):
        VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)


# ---------------------------------------------------------------------------- compact files
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.data())
def test_pack_bits_roundtrip(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50))
    packed = compact.pack_bits(torch.tensor(values, dtype=torch.long), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) * bits / 8)
    assert compact.unpack_bits(packed, bits, len(values)).tolist() == values


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8 : 8 + size])


@pytest.mark.parametrize(
    ("bank_dtype", "tol"),
    [(torch.float32, 1e-3), (torch.float16, 1e-2), (torch.bfloat16, 3e-2), (torch.int8, 3e-2)],
)
def test_compact_roundtrip(bases, tmp_path, bank_dtype, tol):
    ours = _ours(bases["llama"], "llama")
    ours.save_pretrained(tmp_path / "dir", save_only_topk_weights=True)
    ref = _out(VBLoRAModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "dir"))
    path = tmp_path / "a.vblora"
    save_compact(ours, path, bank_dtype=bank_dtype)
    loaded = load_compact(copy.deepcopy(bases["llama"]), path)
    assert _rel(_out(loaded), ref) <= tol
    assert loaded.vblora_banks["default"].inference_only
    _, header = _header(path)
    bank = ours.vblora_banks["default"]
    # Layout once in the metadata; tensors: bank, packed indices, fp16 weights, head copy, biases.
    layout = json.loads(header["__metadata__"]["layout"])
    assert [p for p, _, _ in layout] == list(bank.layout)
    assert not any(p in key for p in bank.layout for key in header if "bias" not in key)
    assert header["topk_indices"]["dtype"] == "U8" and header["topk_weights"]["dtype"] == "F16"
    assert header["topk_indices"]["shape"] == [math.ceil(bank.num_subvectors * K * 4 / 8)]  # 4 bits for h=12
    assert (
        header["bank"]["dtype"]
        == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8"}[bank_dtype]
    )
    assert ("bank_scale" in header) == (bank_dtype == torch.int8)


def test_int8_bank_matches_a_plain_loop_quantiser(tmp_path):
    bank = torch.randn(5, 8)
    bank[2] = 0.0  # an all-zero vector keeps scale 0 and stays zero
    stored = compact.stored_bank(bank, torch.int8)
    for i in range(5):
        scale = max(abs(v) for v in bank[i].tolist()) / 127
        assert stored["bank_scale"][i].item() == pytest.approx(scale)
        for j in range(8):
            expected = 0 if scale == 0 else max(-127, min(127, round(bank[i, j].item() / scale)))
            assert stored["bank"][i, j].item() == expected
    restored = stored["bank"].float() * stored["bank_scale"][:, None]
    assert (restored - bank).abs().max() <= stored["bank_scale"].max() / 2 + 1e-7


def test_compact_header_does_not_dominate_tiny_files(tmp_path):
    model = get_vblora_model(
        _llama(), VBLoRAConfig(r=4, num_vectors=64, vector_length=16, topk=2, target_modules="all-linear")
    )
    path = tmp_path / "tiny.vblora"
    save_compact(model, path, bank_dtype=torch.float16)
    size, _ = _header(path)
    assert size < 0.5 * (path.stat().st_size - 8 - size)


def test_compact_llama7b_shape_is_small(tmp_path):
    def block() -> nn.Module:
        m = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(m, n, nn.Linear(4096, 4096, bias=False))
        m.gate_proj, m.up_proj = nn.Linear(4096, 11008, bias=False), nn.Linear(4096, 11008, bias=False)
        m.down_proj = nn.Linear(11008, 4096, bias=False)
        return m

    with torch.device("meta"):  # the 6.5B base weights never exist
        base = nn.Module()
        base.layers = nn.ModuleList(block() for _ in range(32))
    model = get_vblora_model(
        base, VBLoRAConfig(r=4, num_vectors=2048, vector_length=256, topk=2, target_modules="all-linear")
    )
    bank = model.vblora_banks["default"].to_empty(device="cpu")
    with torch.no_grad():
        bank.bank.uniform_(-0.02, 0.02)
        bank.logits.normal_(0.0, 0.1)
    save_compact(model, tmp_path / "7b.vblora", bank_dtype=torch.float16)
    assert (tmp_path / "7b.vblora").stat().st_size <= 1_300_000


def test_load_compact_into_existing_model(bases, tmp_path):
    ours = _ours(bases["bert"], "bert")
    ref = _out(ours)
    save_compact(ours, tmp_path / "a.vblora")
    host = get_vblora_model(
        copy.deepcopy(bases["bert"]),
        VBLoRAConfig(r=2, num_vectors=H, vector_length=B, target_modules=["key"]),
    )
    assert load_compact(host, tmp_path / "a.vblora", adapter_name="user1") is host
    host.set_adapter("user1")
    assert _rel(_out(host.eval()), ref) <= 1e-3


# ---------------------------------------------------------------------------- LoRA export
@pytest.mark.parametrize("name", list(MODELS))
def test_export_lora_loads_in_peft(bases, tmp_path, name):
    ours = _ours(bases[name], name)
    ref = _out(ours)
    export_lora(ours, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, peft.LoraConfig) and config.lora_alpha == config.r == R
    assert config.modules_to_save == MODELS[name][1]["modules_to_save"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases[name]), tmp_path).eval()
    assert _rel(_out(theirs), ref) <= 1e-5
    path = "bert.encoder.layer.0.attention.self.query" if name == "bert" else None
    if path:  # the factors are exactly A and B
        a, b = ours.vblora_banks["default"].compose()[path]
        assert torch.equal(theirs.get_submodule(f"base_model.model.{path}").lora_A["default"].weight, a)
        assert torch.equal(theirs.get_submodule(f"base_model.model.{path}").lora_B["default"].weight, b)


# ---------------------------------------------------------------------------- safety
def _crash_midway(monkeypatch, after: str) -> None:
    """Make the write of files named ``after`` fail halfway through, as a crash would."""
    real = atomic.write_all

    def write(handle, data):
        name = Path(handle.name).name
        if name == after or name.startswith(f".{after}."):  # in a staged folder, or a temporary
            handle.write(data[: len(data) // 2])
            raise OSError("simulated crash")
        real(handle, data)

    monkeypatch.setattr(atomic, "write_all", write)


def test_interrupted_save_keeps_previous_adapter(bases, tmp_path, monkeypatch):
    ours = _ours(bases["bert"], "bert")
    ref = _out(ours)
    ours.save_pretrained(tmp_path)
    save_compact(ours, tmp_path / "a.vblora")
    with torch.no_grad():
        ours.vblora_banks["default"].bank.mul_(2.0)
    config_before = (tmp_path / CONFIG_NAME).read_bytes()
    _crash_midway(monkeypatch, WEIGHTS_NAME)
    with pytest.raises(OSError, match="simulated crash"):
        ours.save_pretrained(tmp_path, save_only_topk_weights=True)  # a different config, too
    assert (tmp_path / CONFIG_NAME).read_bytes() == config_before
    _crash_midway(monkeypatch, "a.vblora")
    with pytest.raises(OSError, match="simulated crash"):
        save_compact(ours, tmp_path / "a.vblora")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",  # the model card, as PEFT writes it
        "a.vblora",
        CONFIG_NAME,
        WEIGHTS_NAME,
    ]
    assert _rel(_out(VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)), ref) <= 1e-6
    assert _rel(_out(load_compact(copy.deepcopy(bases["bert"]), tmp_path / "a.vblora")), ref) <= 1e-3


def test_every_writer_refuses_a_bad_target_before_writing_and_creates_missing_folders(bases, tmp_path):
    ours = _ours(bases["bert"], "bert")
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "a-folder").mkdir()
    bad = [
        (lambda: ours.save_pretrained(tmp_path / "a-file"), "a-file: exists and is not a directory"),
        (lambda: export_lora(ours, tmp_path / "a-file"), "a-file: exists and is not a directory"),
        (lambda: save_compact(ours, tmp_path / "a-folder"), "a-folder: is a directory; name the file"),
        (lambda: save_compact(ours, tmp_path / "a-file" / "x.vblora"), "a-file: exists and is not a dir"),
    ]
    for write, message in bad:
        with pytest.raises(ValueError, match=message):
            write()
    assert (tmp_path / "a-file").read_text() == "keep" and not any((tmp_path / "a-folder").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]  # no temporaries
    save_compact(ours, tmp_path / "new" / "deeper" / "a.vblora")
    export_lora(ours, tmp_path / "new" / "lora")
    assert (tmp_path / "new" / "deeper" / "a.vblora").is_file()
    assert (tmp_path / "new" / "lora" / CONFIG_NAME).is_file()


@pytest.mark.parametrize("tied", [False, True])
def test_peft_checkpoints_that_adapt_lm_head_load_with_equal_outputs(tmp_path, tied):
    """PEFT also saves the full weight of an adapted lm_head/embed_tokens (``<path>.base_layer.weight``)."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    settings = {**ADAPTER, "bias": "none", "target_modules": ["q_proj", "lm_head"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**settings))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    assert any(k.endswith("lm_head.base_layer.weight") for k in load_file(tmp_path / WEIGHTS_NAME))
    ours = VBLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert _rel(_out(ours), _out(theirs.eval())) <= 1e-5
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(80)  # a vocabulary of another size: refused, model unchanged
    before = _snapshot(resized)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight: shape \(64, 32\), but the model's"):
        VBLoRAModel.from_pretrained(resized, tmp_path)
    _assert_unchanged(resized, before)


@pytest.mark.parametrize("name", ["a/b", "/tmp/escaped", "a\\b", "nul\x00", "__base__", ""])
def test_adapter_names_that_are_paths_or_reserved_are_refused(bases, tmp_path, name):
    ours = _ours(bases["bert"], "bert", bias="none")
    ours.save_pretrained(tmp_path / "dir")
    save_compact(ours, tmp_path / "a.vblora")
    before = _snapshot(ours)
    with pytest.raises(ValueError, match="adapter name"):
        ours.add_adapter(name, ours.peft_config["default"])
    with pytest.raises(ValueError, match="adapter name"):
        ours.load_adapter(tmp_path / "dir", name)
    with pytest.raises(ValueError, match="adapter name"):
        load_compact(ours, tmp_path / "a.vblora", name)
    _assert_unchanged(ours, before)


def test_absurdly_nested_json_is_a_value_error(bases, tmp_path):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[" * 50000 + "]" * 50000)
    base = copy.deepcopy(bases["bert"])
    with pytest.raises(ValueError, match="not a valid VB-LoRA adapter config"):
        VBLoRAModel.from_pretrained(base, tmp_path)


def test_a_failed_install_restores_the_base_models_trainable_flags(bases, tmp_path, monkeypatch):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path, save_only_topk_weights=True)
    base = copy.deepcopy(bases["bert"])
    before = _snapshot(base)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after validation, while the tensors are copied

    monkeypatch.setattr(AdapterBank, "keep_topk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        VBLoRAModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


def test_peft_style_save_arguments_and_empty_or_plural_names(bases, tmp_path):
    ours = _ours(bases["bert"], "bert", bias="none")
    ours.add_adapter("b", ours.peft_config["default"])
    ours.save_pretrained(tmp_path / "peft-style", selected_adapters=["b"], safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "peft-style").iterdir()) == ["README.md", "b"]  # PEFT's layout
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match="no adapter to save"):
        ours.save_pretrained(tmp_path / "x", adapter_name=[])
    for writer in (save_compact, export_lora):
        with pytest.raises(ValueError, match="must be one adapter's name"):
            writer(ours, tmp_path / "x", adapter_name=["default", "b"])
    assert not (tmp_path / "x").exists()


def test_pickle_checkpoints_are_refused(bases, tmp_path, monkeypatch):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / readers.PICKLE_NAME)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match=r"(?s)pickle checkpoints are never loaded.*st\.save_file"):
        VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)


Q0 = "bert.encoder.layer.0.attention.self.query"


def _edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_NAME)
        fn(tensors)
        save_file(tensors, folder / WEIGHTS_NAME)

    return corrupt


def _edit_config(**changes) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        data = json.loads((folder / CONFIG_NAME).read_text())
        (folder / CONFIG_NAME).write_text(json.dumps({**data, **changes}))

    return corrupt


def _truncate(folder: Path) -> None:
    raw = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(raw[:-100])


def _set(key: str, index: tuple, value: float) -> Callable[[Path], None]:
    return _edit_tensors(lambda t: t[key].__setitem__(index, value))


A0 = f"base_model.model.{Q0}.vblora_logits_A"
CORRUPTIONS = {  # name: (topk, corruption, fragment of the expected message)
    "missing_module": (
        False,
        _edit_tensors(lambda t: [t.pop(k) for k in list(t) if f"{Q0}.vblora" in k]),
        f"{Q0}: targeted by the config in this model but missing",
    ),
    "extra_module": (
        False,
        _edit_tensors(lambda t: t.update({A0.replace("query", "key"): t[A0].clone()})),
        "attention.self.key: stored in the checkpoint but not targeted",
    ),
    "wrong_shape": (False, _edit_tensors(lambda t: t.update({A0: t[A0][:1]})), "need (2, 2, 12)"),
    "vector_length": (False, _edit_config(vector_length=8), "vector_length=8"),
    "num_vectors": (True, _edit_config(num_vectors=20), "num_vectors=20"),
    "index_range": (True, _set(A0 + "_topk_indices", (0, 0, 0), H), "out of range [0, 12)"),
    "repeated_index": (
        True,
        _edit_tensors(lambda t: t[A0 + "_topk_indices"][..., 1].copy_(t[A0 + "_topk_indices"][..., 0])),
        "repeats an index",
    ),
    "nan_logits": (False, _set(A0, (0, 0, 0), float("nan")), "NaN or +inf logits"),
    "inf_bank": (False, _set(readers.BANK_KEY, (0, 0), float("inf")), "vector bank contains NaN or inf"),
    "nan_weights": (True, _set(A0 + "_topk_weights", (0, 0, 0), float("nan")), "NaN or inf"),
    "weights_sum": (True, _set(A0 + "_topk_weights", (0, 0, 0), 1.5), "sum to at most 1"),
    "head_shape": (
        False,
        _edit_tensors(lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(3, 32)})),
        "classifier.weight: shape (3, 32)",
    ),
    "unexpected_key": (
        False,
        _edit_tensors(lambda t: t.update({"junk": torch.zeros(1)})),
        "junk: unexpected key",
    ),
    "truncated": (False, _truncate, "truncated or corrupt"),
    "garbage": (
        False,
        lambda f: (f / WEIGHTS_NAME).write_bytes(b"\x10" + bytes(200)),
        "truncated or corrupt",
    ),
    "bad_json": (
        False,
        lambda f: (f / CONFIG_NAME).write_text("{not json"),
        "not a valid VB-LoRA adapter config",
    ),
    "not_vblora": (False, _edit_config(peft_type="LORA"), "not a VB-LoRA config"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoints_are_refused_and_model_unchanged(bases, tmp_path, case):
    topk, corrupt, message = CORRUPTIONS[case]
    _ours(bases["bert"], "bert").save_pretrained(tmp_path, save_only_topk_weights=topk)
    corrupt(tmp_path)
    host = _ours(bases["bert"], "bert").train()  # an existing model: the load must not touch it
    before = _snapshot(host)
    with pytest.raises(ValueError, match=None) as err:
        host.load_adapter(tmp_path, "new")
    assert message in str(err.value)
    _assert_unchanged(host, before)
    base = copy.deepcopy(bases["bert"])
    before = _snapshot(base)
    with pytest.raises(ValueError, match=None) as err:
        VBLoRAModel.from_pretrained(base, tmp_path)
    assert message in str(err.value)
    _assert_unchanged(base, before)


def test_all_problems_are_listed_in_one_error(bases, tmp_path):
    _ours(bases["bert"], "bert").save_pretrained(tmp_path)
    _set(A0.replace("query", "value"), (0, 0, 0), float("nan"))(tmp_path)
    CORRUPTIONS["missing_module"][1](tmp_path)
    _set(readers.BANK_KEY, (0, 0), float("nan"))(tmp_path)
    with pytest.raises(ValueError, match="3 problem") as err:
        VBLoRAModel.from_pretrained(copy.deepcopy(bases["bert"]), tmp_path)
    assert "model was not changed" in str(err.value)


def _rewrite_compact(path: Path, edit: Callable[[dict, dict], None]) -> None:
    with safe_open(str(path), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _bad_index(tensors: dict, _: dict) -> None:
    tensors["topk_indices"][0] = 0xFF  # the first two 4-bit indices become 15 >= h = 12


COMPACT_CORRUPTIONS = {
    "index_range": (lambda p: _rewrite_compact(p, _bad_index), "out of range [0, 12)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or corrupt"),
    "layout": (lambda p: _rewrite_compact(p, lambda t, m: m.update(layout="[1, 2]")), "'layout' is missing"),
    "packed_size": (
        lambda p: _rewrite_compact(p, lambda t, m: t.update(topk_indices=t["topk_indices"][:-1])),
        "topk_indices:",
    ),
    "other_model": (
        lambda p: _rewrite_compact(
            p, lambda t, m: m.update(layout=m["layout"].replace("layer.1.", "layer.7."))
        ),
        "layer.7.attention.self.query: stored",
    ),
    "layer_shape": (
        lambda p: _rewrite_compact(
            p,
            lambda t, m: m.update(
                layout=m["layout"].replace(
                    'layer.0.attention.self.query",32', 'layer.0.attention.self.query",64'
                )
            ),
        ),
        "stored for a 64 -> 32 layer, but the model's is 32 -> 32",
    ),
    "format": (
        lambda p: _rewrite_compact(p, lambda t, m: m.pop("vblora_format")),
        "not a compact VB-LoRA file",
    ),
    "int8_without_scale": (
        lambda p: _rewrite_compact(p, lambda t, m: t.update(bank=t["bank"].to(torch.int8))),
        "bank_scale: missing",
    ),
    "scale_with_float_bank": (
        lambda p: _rewrite_compact(p, lambda t, m: t.update(bank_scale=torch.ones(12))),
        "bank_scale: present, but the bank is not int8",
    ),
    "scale_shape": (
        lambda p: _rewrite_compact(
            p, lambda t, m: t.update(bank=t["bank"].to(torch.int8), bank_scale=torch.ones(11))
        ),
        "bank_scale: shape (11,)",
    ),
    "scale_nan": (
        lambda p: _rewrite_compact(
            p,
            lambda t, m: t.update(bank=t["bank"].to(torch.int8), bank_scale=torch.full((12,), float("nan"))),
        ),
        "bank_scale: negative, NaN or inf",
    ),
}


@pytest.mark.parametrize("case", list(COMPACT_CORRUPTIONS))
def test_corrupt_compact_files_are_refused(bases, tmp_path, case):
    corrupt, message = COMPACT_CORRUPTIONS[case]
    path = tmp_path / "a.vblora"
    save_compact(_ours(bases["bert"], "bert"), path)
    corrupt(path)
    host = _ours(bases["bert"], "bert")
    before = _snapshot(host)
    with pytest.raises(ValueError, match=None) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_compact(host, path, adapter_name="new")
    assert message in str(err.value)
    _assert_unchanged(host, before)
    # read_compact (used by vblora inspect) finds the same problems in the file alone, except a
    # layout that is consistent but names another model's layers: that needs the model
    if case == "other_model":
        assert compact.read_compact(path).layout
        return
    with pytest.raises(ValueError, match=None) as err:
        compact.read_compact(path)
    # a layer made larger in the header no longer matches the packed indices' length
    assert ("topk_indices:" if case == "layer_shape" else message) in str(err.value)


def test_read_compact_returns_what_load_compact_serves(bases, tmp_path):
    ours = _ours(bases["bert"], "bert")
    save_compact(ours, tmp_path / "a.vblora", bank_dtype=torch.int8)
    contents = compact.read_compact(tmp_path / "a.vblora")
    bank = ours.vblora_banks["default"]
    assert contents.config.num_vectors == bank.num_vectors and contents.stored_bank_dtype == torch.int8
    assert list(contents.layout) == list(bank.layout)
    chosen = bank.logits.detach().topk(bank.topk, dim=-1).indices
    assert torch.equal(contents.indices.sort(dim=-1).values, chosen.sort(dim=-1).values)
    assert torch.allclose(contents.weights.sum(dim=-1), torch.ones(len(contents.weights)), atol=1e-3)
    served = load_compact(copy.deepcopy(bases["bert"]), tmp_path / "a.vblora").vblora_banks["default"]
    torch.testing.assert_close(contents.bank, served.bank.detach())


def _sizes_as_strings(_: dict, metadata: dict) -> None:
    metadata["layout"] = json.dumps([[p, str(i), o] for p, i, o in json.loads(metadata["layout"])])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda tensors, _: tensors.update(extra=torch.zeros(1)), "extra: unexpected key"),
        (_sizes_as_strings, "header 'layout' is missing or malformed"),
    ],
    ids=["stray-tensor", "sizes-as-strings"],
)
def test_read_compact_refuses_what_load_compact_refuses(bases, tmp_path, edit, message):
    path = tmp_path / "a.vblora"
    save_compact(_ours(bases["bert"], "bert"), path)
    _rewrite_compact(path, edit)
    with pytest.raises(ValueError, match=message):
        compact.read_compact(path)
    with pytest.raises(ValueError, match=message):
        load_compact(copy.deepcopy(bases["bert"]), path)
