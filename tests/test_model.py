"""VBLoRAModel over an MLP and tiny GPT-2 (Conv1D), Llama, BERT and T5 built from configs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from conftest import BUILDERS, MLP, model_inputs, output_tensor, tiny_llama
from vblora import VBLoRAConfig, VBLoRAModel, get_vblora_model, optimizer_param_groups
from vblora.core.bank import AdapterBank
from vblora.layers import ModulesToSaveWrapper, VBLoRALayer

CONFIGS = {
    "mlp": VBLoRAConfig(r=2, num_vectors=10, vector_length=2, target_modules=["lin0", "lin1", "lin3"]),
    "llama": VBLoRAConfig(num_vectors=32, vector_length=16, target_modules="all-linear"),
    "gpt2": VBLoRAConfig(num_vectors=32, vector_length=16, target_modules=["c_attn", "c_proj", "c_fc"]),
    "bert": VBLoRAConfig(
        num_vectors=32,
        vector_length=16,
        target_modules=["query", "key", "value", "dense"],
        modules_to_save=["classifier"],
    ),
    "t5": VBLoRAConfig(num_vectors=32, vector_length=16),
}
# Larger init so that adapters visibly change outputs of the tiny random models.
BIG = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0}


def build(name: str, seed: int = 0, **overrides) -> tuple[VBLoRAModel, dict]:
    cfg = dataclasses.replace(CONFIGS[name], **{**BIG, **overrides})
    torch.manual_seed(seed)
    return get_vblora_model(BUILDERS[name](), cfg), model_inputs(name)


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


def layers(model: VBLoRAModel) -> list[VBLoRALayer]:
    return list(model.vblora_layers())


def test_shapes_and_one_bank_one_table_per_adapter(model_name: str) -> None:
    model, inputs = build(model_name)
    model.add_adapter("other", dataclasses.replace(CONFIGS[model_name], r=3))
    for name, cfg in model.peft_config.items():
        keys = [k for k in model.state_dict() if k.startswith(f"vblora_banks.{name}.")]
        assert sorted(keys) == [f"vblora_banks.{name}.bank", f"vblora_banks.{name}.logits"]
        params = [n for n, _ in model.named_parameters() if f".{name}." in n and "vblora" in n]
        assert sorted(params) == sorted(keys)
        bank = model.vblora_banks[name]
        rows = sum(
            cfg.r * (layer.in_features + layer.out_features) // cfg.vector_length for layer in layers(model)
        )
        assert bank.bank.shape == (cfg.num_vectors, cfg.vector_length)
        assert bank.logits.shape == (rows, cfg.num_vectors)
        for layer in layers(model):
            a, b = bank.factors(layer.path)
            assert a.shape == (cfg.r, layer.in_features) and b.shape == (layer.out_features, cfg.r)
    # No bank is registered under any layer.
    assert not any("vblora_banks" in k for k in model.model.state_dict())
    base_out = run(model, inputs)
    assert base_out.shape[0] == 2


def test_gradients_reach_exactly_the_selected_logits_and_the_bank(model_name: str) -> None:
    model, inputs = build(model_name)
    model.train()
    output_tensor(model(**inputs)).square().sum().backward()
    bank = model.vblora_banks["default"]
    grad = bank.logits.grad
    selected = torch.zeros_like(grad, dtype=torch.bool).scatter(
        -1, bank.logits.topk(bank.topk, -1).indices, True
    )
    assert (grad[~selected] == 0).all()
    assert (grad[selected] != 0).float().mean() > 0.8  # zeros only where a ReLU cut the path
    assert bank.bank.grad.abs().sum() > 0
    base_grads = [p.grad for n, p in model.model.named_parameters() if "modules_to_save" not in n]
    assert all(g is None for g in base_grads)


def test_merged_equals_unmerged_and_unmerge_restores_weights(model_name: str) -> None:
    model, inputs = build(model_name)
    weights = {layer.path: layer.base_layer.weight.detach().clone() for layer in layers(model)}
    unmerged = run(model, inputs)
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for layer in layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[layer.path], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, inputs), unmerged, atol=1e-5, rtol=0)


def test_disable_restores_base_outputs_and_previous_state(model_name: str) -> None:
    torch.manual_seed(0)
    base = BUILDERS[model_name]()
    inputs = model_inputs(model_name)
    base_out = run(base, inputs)
    model, _ = build(model_name)
    adapted = run(model, inputs)
    assert not torch.allclose(adapted, base_out)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), base_out)
    torch.testing.assert_close(run(model, inputs), adapted)
    # Merged state is restored too, also when the body raises.
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), base_out, atol=1e-5, rtol=0)
        raise RuntimeError("boom")
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(run(model, inputs), adapted, atol=1e-5, rtol=0)


def test_two_adapters_differ_and_are_summed(model_name: str) -> None:
    model, inputs = build(model_name)
    model.add_adapter("b", dataclasses.replace(CONFIGS[model_name], **BIG, modules_to_save=None))
    out_a = run(model, inputs)
    model.set_adapter("b")
    out_b = run(model, inputs)
    assert not torch.allclose(out_a, out_b)
    model.set_adapter(["default", "b"])
    both = run(model, inputs)
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    # The sum is exactly what merging both adapters into the weights gives.
    merged = copy.deepcopy(model)
    merged.merge_adapter(["default", "b"])
    torch.testing.assert_close(run(merged, inputs), both, atol=1e-5, rtol=1e-4)


def test_sum_of_two_adapters_on_one_linear_layer() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12))
    x = torch.randn(5, 8)
    cfg = VBLoRAConfig(r=2, num_vectors=6, vector_length=4, target_modules=["0"], **BIG)
    model = get_vblora_model(base, cfg)
    model.add_adapter("b", cfg)
    layer = model.model[0]
    with torch.no_grad():
        y0 = layer.base_layer(x)
        model.set_adapter(["default", "b"])
        y = model(x)
        expect = y0 + x @ layer.delta_weight("default").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(y, expect, atol=1e-6, rtol=0)


def test_delete_adapter_leaves_nothing(model_name: str) -> None:
    model, inputs = build(model_name)
    keys_before = set(model.state_dict())
    only_default = run(model, inputs)
    model.add_adapter("gone", dataclasses.replace(CONFIGS[model_name], **BIG))
    model.set_adapter(["gone"])
    model.delete_adapter("gone")
    assert set(model.state_dict()) == keys_before
    assert "gone" not in model.peft_config and "gone" not in model.vblora_banks
    assert model.active_adapters == ["default"]
    for module in model.modules():
        for attr in ("banks", "dropout_rates", "modules_to_save"):
            assert "gone" not in getattr(module, attr, {})
    torch.testing.assert_close(run(model, inputs), only_default)
    # Deleting the last adapter unwraps every layer.
    model.delete_adapter("default")
    assert not any(isinstance(m, (VBLoRALayer, ModulesToSaveWrapper, AdapterBank)) for m in model.modules())


def test_delta_weights_equal_peft_given_same_bank_and_logits(model_name: str) -> None:
    peft = pytest.importorskip("peft")
    ours, _ = build(model_name)
    cfg = CONFIGS[model_name]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        BUILDERS[model_name](),
        peft.VBLoRAConfig(
            r=cfg.r,
            num_vectors=cfg.num_vectors,
            vector_length=cfg.vector_length,
            topk=cfg.topk,
            target_modules=list(cfg.target_modules)
            if isinstance(cfg.target_modules, tuple)
            else cfg.target_modules,
        ),
    )
    bank = ours.vblora_banks["default"]
    peft_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in theirs.named_modules()
        if hasattr(m, "vblora_logits_A") and "default" in m.vblora_logits_A
    }
    assert set(peft_layers) == {layer.path for layer in layers(ours)}
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].copy_(bank.bank)
        for layer in layers(ours):
            slot, target = bank.layout[layer.path], peft_layers[layer.path]
            target.vblora_logits_A["default"].copy_(
                bank.logits[slot.a_offset : slot.b_offset].reshape_as(target.vblora_logits_A["default"])
            )
            target.vblora_logits_B["default"].copy_(
                bank.logits[slot.b_offset : slot.end].reshape_as(target.vblora_logits_B["default"])
            )
    for layer in layers(ours):
        torch.testing.assert_close(
            layer.delta_weight("default"),
            peft_layers[layer.path].get_delta_weight("default"),
            rtol=1e-6,
            atol=1e-7,
        )


def test_training_lowers_the_loss() -> None:
    model = get_vblora_model(
        tiny_llama(), VBLoRAConfig(num_vectors=32, vector_length=16, target_modules="all-linear")
    )
    model.train()
    opt = torch.optim.AdamW(optimizer_param_groups(model, logits_lr=1e-2, bank_lr=1e-2))
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(60):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_half_precision_base_keeps_adapter_in_fp32() -> None:
    model = get_vblora_model(tiny_llama().to(torch.bfloat16), CONFIGS["llama"])
    bank = model.vblora_banks["default"]
    assert bank.bank.dtype == torch.float32 and bank.logits.dtype == torch.float32
    out = output_tensor(model(input_ids=torch.randint(0, 128, (2, 6))))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    layer = layers(model)[0]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = bank.factors(layer.path)
        expect = layer.base_layer(x).float() + x.float() @ a.T @ b.T
        torch.testing.assert_close(layer(x).float(), expect, atol=2e-2, rtol=2e-2)


def test_inference_cache_is_reused_and_invalidated() -> None:
    model, inputs = build("llama")
    model.eval()
    bank = model.vblora_banks["default"]
    first = run(model, inputs)
    cached = bank._factors
    assert run(model, inputs).equal(first) and bank._factors is cached  # reused, not recomposed
    with torch.no_grad():
        bank.bank.mul_(2.0)  # an in-place change (e.g. optimizer step, load_state_dict)
    changed = run(model, inputs)
    assert bank._factors is not cached and not torch.allclose(changed, first)
    model.add_adapter("b", dataclasses.replace(CONFIGS["llama"], **BIG))
    model.set_adapter("b")
    assert not torch.allclose(run(model, inputs), changed)
    model.set_adapter("default")
    torch.testing.assert_close(run(model, inputs), changed)
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), changed, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    bank.keep_topk(*bank.selection())  # an inference-only adapter: its selection buffers count too
    kept = run(model, inputs)
    with torch.no_grad():
        bank.topk_weights.mul_(0.5)  # e.g. load_state_dict
    halved = run(model, inputs)
    bank.clear_cache()
    torch.testing.assert_close(run(model, inputs), halved, atol=0, rtol=0)
    assert not torch.allclose(halved, kept)


def test_a_submodule_called_directly_gets_current_factors() -> None:
    """generate() on an encoder-decoder runs the encoder itself, not through the model's forward
    (which composes once per pass): the encoder still sees every change, and a graph when needed."""
    model = get_vblora_model(BUILDERS["t5"](), dataclasses.replace(CONFIGS["t5"], **BIG)).eval()
    encoder = model.model.get_encoder()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def encode(m: nn.Module) -> torch.Tensor:
        return m.model.get_encoder()(input_ids=ids).last_hidden_state

    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2)  # composes and caches
        model.vblora_banks["default"].bank.mul_(3.0)  # an optimizer step would do the same
        reference = get_vblora_model(BUILDERS["t5"](), dataclasses.replace(CONFIGS["t5"], **BIG)).eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(encode(model), encode(reference), atol=0, rtol=0)
        kwargs = {"input_ids": ids, "max_new_tokens": 3, "do_sample": False}
        assert model.generate(**kwargs).equal(reference.generate(**kwargs))
    encoder(input_ids=ids).last_hidden_state.square().sum().backward()  # after no-grad use
    assert model.vblora_banks["default"].logits.grad.abs().sum() > 0


def test_a_forward_stopped_by_ctrl_c_leaves_no_trusted_stale_factors() -> None:
    model, inputs = build("mlp")
    model.eval()
    stop = model.model.lin1.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(model, inputs)
    stop.remove()
    bank = model.vblora_banks["default"]
    assert not bank.in_pass  # the end hook misses KeyboardInterrupt; forward's finally does not
    with torch.no_grad():
        bank.bank.add_(1.0)
        direct = model.model.lin0(inputs["x"])  # a layer called directly checks its factors
        bank.clear_cache()
        torch.testing.assert_close(direct, model.model.lin0(inputs["x"]), atol=0, rtol=0)


def test_factors_cached_in_inference_mode_are_not_reused_outside_it() -> None:
    model, inputs = build("mlp")
    model.eval()
    model.vblora_banks["default"].requires_grad_(False)  # frozen: no graph needed for the adapter
    with torch.inference_mode():
        run(model, inputs)  # caches inference tensors
    x = inputs["x"].clone().requires_grad_(True)
    model.model.lin0(x).sum().backward()  # a direct call that needs the input's gradient
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_generate_matches_step_by_step_argmax() -> None:
    model, _ = build("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert out.equal(seq)


def test_gradient_accumulation_and_checkpointing_give_the_same_gradients() -> None:
    model, inputs = build("llama")
    model.train()
    ids = inputs["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    single = model.vblora_banks["default"].logits.grad.clone()
    model.zero_grad()
    for _ in range(2):  # two micro-batches before one step: the graph must be rebuilt each pass
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.vblora_banks["default"].logits.grad, 2 * single)
    model.zero_grad()
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.vblora_banks["default"].logits.grad, single, atol=1e-7, rtol=1e-5)


def test_to_dtype_and_deepcopy() -> None:
    model, inputs = build("gpt2")
    ref = run(model, inputs)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(twin, inputs), ref)
    with torch.no_grad():
        twin.vblora_banks["default"].bank.zero_()
    torch.testing.assert_close(run(model, inputs), ref)  # independent copies
    model.to(torch.float64)
    assert model.vblora_banks["default"].bank.dtype == torch.float64
    torch.testing.assert_close(run(model, inputs).float(), ref, atol=1e-4, rtol=1e-4)


def test_training_forward_compiles_without_graph_breaks() -> None:
    import torch._dynamo as dynamo

    for name in ("mlp", "llama"):
        model, inputs = build(name)
        model.train()

        def step(model: nn.Module = model, **kw: torch.Tensor) -> torch.Tensor:
            return output_tensor(model(**kw)).sum()

        explanation = dynamo.explain(step)(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    # The compiled step computes the same loss and gradients as eager.
    model, inputs = build("mlp")
    model.train()
    eager = output_tensor(model(**inputs)).sum()
    eager.backward()
    want = model.vblora_banks["default"].logits.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = output_tensor(compiled(**inputs)).sum()
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(model.vblora_banks["default"].logits.grad, want)


def test_only_adapter_parameters_are_trainable() -> None:
    model, _ = build("bert")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "vblora_banks.default.bank",
        "vblora_banks.default.logits",
        "model.classifier.modules_to_save.default.weight",
        "model.classifier.modules_to_save.default.bias",
    }
    count, total = model.get_nb_trainable_parameters()
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())
    model.add_adapter(
        "second", CONFIGS["mlp"].__class__(num_vectors=8, vector_length=16, target_modules=["query"])
    )
    assert not model.vblora_banks["second"].bank.requires_grad  # inactive adapters are frozen
    model.set_adapter("second")
    assert (
        model.vblora_banks["second"].bank.requires_grad
        and not model.vblora_banks["default"].bank.requires_grad
    )


@pytest.mark.parametrize("bias", ["all", "vblora_only"])
def test_bias_options(bias: str) -> None:
    model = get_vblora_model(
        MLP(), VBLoRAConfig(vector_length=2, num_vectors=4, target_modules=["lin0"], bias=bias)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "all":
        assert trainable == {"model.lin0.base_layer.bias"} | {f"model.lin{i}.bias" for i in (1, 2, 3)}
    else:
        assert trainable == {"model.lin0.base_layer.bias"}
    with pytest.raises(ValueError, match="only one adapter may train biases"):
        model.add_adapter(
            "b", VBLoRAConfig(vector_length=2, num_vectors=4, target_modules=["lin1"], bias="all")
        )

    def biases() -> set[int]:  # by identity: wrapping lin1 below renames its bias
        return {id(p) for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}

    first = biases()
    model.add_adapter("b", VBLoRAConfig(vector_length=2, num_vectors=4, target_modules=["lin1"]))
    model.set_adapter("b")  # the biases train only while their adapter is active
    assert biases() == set()
    model.set_adapter(["b", "default"])
    assert biases() == first
    model.delete_adapter("default")  # deleted: its biases stay in the base model, frozen
    assert biases() == set() and model.active_adapters == ["b"]


def test_savable_parameters_count_one_adapter_only() -> None:
    cfg = VBLoRAConfig(r=4, vector_length=2, num_vectors=10, target_modules=["lin0", "lin1"], topk=2)
    model = get_vblora_model(MLP(), cfg)
    # PEFT's formula for one adapter: bank + logits, or bank + P(k-1) + P*k*index-factor.
    p_rows = 4 * (10 + 20) // 2 + 4 * (20 + 20) // 2
    assert model.get_nb_savable_parameters() == (10 * 2 + p_rows * 10, 0)
    model.add_adapter("topk", dataclasses.replace(cfg, save_only_topk_weights=True, modules_to_save=["lin3"]))
    assert model.get_nb_savable_parameters("default") == (10 * 2 + p_rows * 10, 0)
    assert model.get_nb_savable_parameters("topk") == (
        int(10 * 2 + p_rows * 1 + p_rows * 2 * 0.25),
        20 * 2 + 2,
    )
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        MLP(),
        peft.VBLoRAConfig(
            **{
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k in ("r", "vector_length", "num_vectors", "topk")
            },
            target_modules=["lin0", "lin1"],
        ),
    )
    assert theirs.get_nb_savable_parameters()[0] == model.get_nb_savable_parameters("default")[0]


def test_optimizer_param_groups() -> None:
    model, _ = build("bert")
    groups = {
        g["name"]: g
        for g in optimizer_param_groups(model, logits_lr=0.1, bank_lr=0.01, other_lr=0.5, weight_decay=0.2)
    }
    bank = model.vblora_banks["default"]
    assert groups["vblora_logits"]["params"] == [bank.logits] and groups["vblora_logits"]["lr"] == 0.1
    assert groups["vblora_bank"]["params"] == [bank.bank] and groups["vblora_bank"]["weight_decay"] == 0.0
    head = model.model.classifier.modules_to_save["default"]
    assert {id(p) for p in groups["other"]["params"]} == {id(p) for p in head.parameters()}
    assert groups["other"]["lr"] == 0.5 and groups["other"]["weight_decay"] == 0.2
    torch.optim.AdamW(list(groups.values()))  # accepted by torch


def test_merge_and_unload_and_unload(model_name: str) -> None:
    model, inputs = build(model_name)
    adapted = run(model, inputs)
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, (VBLoRALayer, ModulesToSaveWrapper)) for m in plain.modules())
    torch.testing.assert_close(run(plain, inputs), adapted, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    base_out = run(BUILDERS[model_name](), inputs)
    model, _ = build(model_name)
    model.merge_adapter()
    torch.testing.assert_close(run(model.unload(), inputs), base_out, atol=1e-5, rtol=0)


def test_safe_merge_refuses_non_finite_and_changes_nothing() -> None:
    model, _inputs = build("mlp")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.no_grad():
        model.vblora_banks["default"].bank[0, 0] = float("nan")
        model.vblora_banks["default"].logits[:, 0] = 100.0  # every sub-vector selects the NaN vector
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_merging_into_a_tied_weight_is_refused_and_changes_nothing() -> None:
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = get_vblora_model(
        base, VBLoRAConfig(num_vectors=8, vector_length=16, target_modules=["lm_head"], **BIG)
    )
    inputs = model_inputs("llama")
    before, embeddings = run(model, inputs), base.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match=r"lm_head: its weight is shared .* nothing was merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="tied weights"):
        model.merge_and_unload()
    assert model.merged_adapters == [] and base.model.embed_tokens.weight.equal(embeddings)
    torch.testing.assert_close(run(model, inputs), before, atol=0, rtol=0)


def test_merging_twice_warns_and_does_nothing() -> None:
    model, _inputs = build("mlp")
    model.merge_adapter()
    weights = [layer.base_layer.weight.clone() for layer in layers(model)]
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(torch.equal(w, layer.base_layer.weight) for w, layer in zip(weights, layers(model)))
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        model.unmerge_adapter()


def test_lifecycle_errors() -> None:
    model, _ = build("mlp")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", CONFIGS["mlp"])
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):  # PEFT's wording
        model.delete_adapter("nope")
    with pytest.raises(TypeError, match="VBLoRAConfig"):
        model.add_adapter("x", {"r": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs at least one name"):
        model.set_adapter([])
    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    assert "default" in model.peft_config


def test_repeated_names_count_once_and_a_lone_new_adapter_is_active() -> None:
    model, inputs = build("mlp", **BIG)
    once = run(model, inputs)
    model.set_adapter(["default", "default"])  # not applied twice
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(run(model, inputs), once, atol=0, rtol=0)
    model.merge_adapter(["default", "default"])  # not merged twice
    torch.testing.assert_close(run(model, inputs), once, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    model.add_adapter("b", CONFIGS["mlp"])
    model.delete_adapter("default")
    model.delete_adapter("b")
    model.add_adapter("c", CONFIGS["mlp"])  # nothing else is active: it is
    assert model.active_adapters == ["c"] and model.get_nb_savable_parameters()[0] > 0


def test_a_saved_head_shows_the_weight_in_use() -> None:
    model = get_vblora_model(
        tiny_llama(),
        VBLoRAConfig(num_vectors=8, vector_length=16, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    head = model.model.get_output_embeddings()  # transformers code reads .weight of it
    assert head.weight is head.modules_to_save["default"].weight and head.bias is None
    with model.disable_adapter():
        assert head.weight is head.original_module.weight


def test_dropout_is_applied_in_training_only_and_adds_no_module_per_adapter() -> None:
    """Thousands of adapters must not add thousands of submodules that every walk of the model visits."""
    model, inputs = build("llama", vblora_dropout=0.5)
    for i in range(3):
        model.add_adapter(f"more{i}", dataclasses.replace(CONFIGS["llama"], vblora_dropout=0.5))
    assert all(list(layer.children()) == [layer.base_layer] for layer in layers(model))
    model.eval()
    evaluated = run(model, inputs)
    torch.testing.assert_close(run(model, inputs), evaluated, atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    first = run(model, inputs)
    assert not torch.allclose(first, evaluated) and not torch.allclose(run(model, inputs), first)
    torch.manual_seed(0)
    torch.testing.assert_close(run(model, inputs), first, atol=0, rtol=0)  # seeded like nn.Dropout
    no_dropout, _ = build("llama")
    no_dropout.train()
    torch.testing.assert_close(run(no_dropout, inputs), run(no_dropout.eval(), inputs))


def test_wrapping_an_adapted_model_again_is_refused_and_changes_nothing() -> None:
    model, inputs = build("mlp")
    before = run(model, inputs)
    with pytest.raises(ValueError, match=r"already holds VB-LoRA layers.*add_adapter"):
        get_vblora_model(model.model, CONFIGS["mlp"])  # would re-point the layers at a second bank
    with pytest.raises(TypeError, match="already a VBLoRAModel"):
        get_vblora_model(model, CONFIGS["mlp"])
    torch.testing.assert_close(run(model, inputs), before, atol=0, rtol=0)
    assert all(p.requires_grad for p in model.vblora_banks["default"].parameters())
    again = get_vblora_model(model.unload(), CONFIGS["mlp"])  # unloaded, it is a plain model again
    assert len(layers(again)) == 3


def test_set_adapter_moves_trainability_with_the_heads() -> None:
    model, _ = build("bert")
    cfg = dataclasses.replace(CONFIGS["bert"], bias="none")
    for name in ("b", "c"):
        model.add_adapter(name, cfg)

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def owned(name: str) -> set[str]:
        head = f"model.classifier.modules_to_save.{name}"
        return {f"vblora_banks.{name}.bank", f"vblora_banks.{name}.logits", f"{head}.weight", f"{head}.bias"}

    assert trainable() == owned("default")  # adding adapters leaves them frozen
    for name in ("c", "b", "b", "default", "c"):
        model.set_adapter(name)
        assert trainable() == owned(name)
    model.delete_adapter("c")  # the first remaining adapter becomes active
    assert trainable() == owned("default")


def test_a_module_to_save_holding_another_adapters_layers_is_refused() -> None:
    model, inputs = build("llama")  # all-linear: the MLP blocks hold adapted layers
    before = run(model, inputs)
    targeted = [layer.path for layer in layers(model)]
    cfg = VBLoRAConfig(
        num_vectors=8, vector_length=16, target_modules=["q_proj"], modules_to_save=["layers.1.mlp"]
    )
    # Its trainable copy would hold copies of the first adapter's layers (and of their bank).
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp' contains modules that other adapters"):
        model.add_adapter("b", cfg)
    assert list(model.peft_config) == ["default"] and [layer.path for layer in layers(model)] == targeted
    torch.testing.assert_close(run(model, inputs), before, atol=0, rtol=0)


def test_a_refused_config_leaves_the_base_model_trainable_as_it_was() -> None:
    base = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16))
    with pytest.raises(TypeError, match="Embedding is not supported"):
        get_vblora_model(base, VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=["0"]))
    assert all(p.requires_grad for p in base.parameters())
    assert not any(isinstance(m, VBLoRALayer) for m in base.modules())


def test_modules_to_save_and_target_clashes_name_the_clash() -> None:
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="matched only modules that modules_to_save trains in full"):
        get_vblora_model(
            base, VBLoRAConfig(num_vectors=4, vector_length=8, target_modules=["1"], modules_to_save=["1"])
        )
    model = get_vblora_model(base, VBLoRAConfig(num_vectors=4, vector_length=8, target_modules=["0"]))
    with pytest.raises(ValueError, match="'0' is a layer another adapter adapts"):
        model.add_adapter(
            "b", VBLoRAConfig(num_vectors=4, vector_length=8, target_modules=["1"], modules_to_save=["0"])
        )
    with pytest.raises(ValueError, match="safe_serialization: pass it by keyword"):
        model.save_pretrained("unused", True)  # PEFT's second positional argument


def test_config_is_not_mutated_by_injection() -> None:
    cfg = VBLoRAConfig(num_vectors=8, vector_length=16, target_modules=["c_attn"])
    snapshot = dataclasses.asdict(cfg)
    get_vblora_model(BUILDERS["gpt2"](), cfg)
    assert dataclasses.asdict(cfg) == snapshot


def test_adapters_added_or_loaded_inside_inference_mode_work(tmp_path) -> None:
    """A server loads adapters while it decodes, inside torch.inference_mode(): the adapters must
    still hold normal tensors (inference tensors have no version counters for the factor cache)."""
    from vblora import load_compact, save_compact

    cfg = dataclasses.replace(CONFIGS["llama"], **BIG)
    source = get_vblora_model(BUILDERS["llama"](), cfg)
    save_compact(source, tmp_path / "a.vblora")
    inputs, base = model_inputs("llama"), BUILDERS["llama"]()
    with torch.inference_mode():
        model = load_compact(base, tmp_path / "a.vblora", "a")
        model.add_adapter("b", cfg)
        load_compact(model, tmp_path / "a.vblora", "c")
        model.set_adapter("c")
        inside = output_tensor(model(**inputs))
    assert not any(t.is_inference() for t in model.state_dict().values())
    torch.testing.assert_close(output_tensor(model(**inputs)), inside, atol=0, rtol=0)
