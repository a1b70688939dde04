"""vblora.peft against peft itself: the same scenario, written once against PEFT's API, runs through
``peft`` and through ``vblora.peft``, and the results are compared (outputs, saved files, config
fields, state-dict helpers, unload/merge semantics, error types)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vblora.peft as vp
from conftest import MLP, tiny_gpt2, tiny_llama, tiny_t5
from vblora import VBLoRAModel

peft = pytest.importorskip("peft")

LIBS = {"peft": peft, "vblora": vp}
MLP_KW = {"target_modules": ["lin0", "lin1"], "vector_length": 2, "num_vectors": 6, "r": 2}
X = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _pair(base: nn.Module, **kw) -> tuple[nn.Module, nn.Module]:
    """(PEFT's model, ours) for the same base and config, ours holding PEFT's adapter tensors."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VBLoRAConfig(**kw)).eval()
    with torch.no_grad():  # trained-looking heads and biases, so that copying them is tested
        for name, p in theirs.named_parameters():
            if p.requires_grad and "vblora" not in name:
                p.add_(0.3 * torch.randn_like(p))
    ours = vp.get_peft_model(copy.deepcopy(base), vp.VBLoRAConfig(**kw)).eval()
    vp.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _files(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(folder / "adapter_model.safetensors").items()}


# ---------------------------------------------------------------------------- state-dict helpers
@pytest.mark.parametrize("topk", [False, True])
def test_state_dict_helpers_agree(topk):
    theirs, ours = _pair(_mlp(), **MLP_KW, modules_to_save=["lin3"], save_only_topk_weights=topk)
    with torch.no_grad():
        assert _rel(ours(X), theirs(X)) < 1e-5
    sd_theirs, sd_ours = peft.get_peft_model_state_dict(theirs), vp.get_peft_model_state_dict(ours)
    assert {k: (v.shape, v.dtype) for k, v in sd_ours.items()} == {
        k: (v.shape, v.dtype) for k, v in sd_theirs.items()
    }
    for key, value in sd_theirs.items():
        if value.is_floating_point():
            assert torch.allclose(sd_ours[key], value, atol=1e-6), key
        else:
            assert torch.equal(sd_ours[key], value), key


def test_set_state_dict_refuses_what_does_not_fit():
    _, ours = _pair(_mlp(), **MLP_KW)
    sd = vp.get_peft_model_state_dict(ours)
    sd["base_model.model.lin0.vblora_logits_A"] = sd["base_model.model.lin0.vblora_logits_A"][:1]
    with pytest.raises(ValueError, match="lin0"):
        vp.set_peft_model_state_dict(ours, sd)


def test_inject_adapter_in_model_works_where_peft_refuses():
    # PEFT refuses inject_adapter_in_model for VB-LoRA (its bank is state shared on the tuner);
    # ours registers the bank on the model and computes what get_peft_model computes.
    with pytest.raises(ValueError, match="shared state"):
        peft.inject_adapter_in_model(peft.VBLoRAConfig(**MLP_KW), _mlp())
    theirs, _ = _pair(_mlp(), **MLP_KW)
    ours = vp.inject_adapter_in_model(vp.VBLoRAConfig(**MLP_KW), _mlp())
    assert isinstance(ours, MLP) and not isinstance(ours, VBLoRAModel)
    assert any(name.startswith("vblora_banks.default.") for name, _ in ours.named_parameters())
    vp.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        assert _rel(ours(X), theirs(X)) < 1e-5
    assert set(vp.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))


def test_base_model_state_dict_has_the_original_keys():
    base = _mlp()
    keys = set(base.state_dict())
    _, ours = _pair(base, **MLP_KW, modules_to_save=["lin3"])
    for lib, model in (("peft", _pair(base, **MLP_KW, modules_to_save=["lin3"])[0]), ("vblora", ours)):
        sd = LIBS[lib].get_base_model_state_dict(model)
        assert set(sd) == keys, lib
    new = {k: torch.zeros_like(v) for k, v in vp.get_base_model_state_dict(ours).items()}
    vp.set_base_model_state_dict(ours, new)
    assert ours.model.lin0.base_layer.weight.abs().sum() == 0


# ---------------------------------------------------------------------------- saved directories
@pytest.mark.parametrize("target", [None, "all-linear"])
def test_saved_config_and_files_agree_with_peft(tmp_path, target):
    base = tiny_llama()
    base.name_or_path = "org/tiny-llama"
    kw = {"target_modules": target, "vector_length": 16, "num_vectors": 8, "task_type": "CAUSAL_LM"}
    theirs, ours = _pair(base, **kw)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert _files(tmp_path / "ours") == _files(tmp_path / "peft")
    cfg = {
        name: json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("peft", "ours")
    }
    for field in ("peft_type", "task_type", "base_model_name_or_path", "r", "num_vectors", "vector_length"):
        assert cfg["ours"][field] == cfg["peft"][field], field
    assert sorted(cfg["ours"]["target_modules"]) == sorted(cfg["peft"]["target_modules"])
    assert cfg["ours"]["base_model_name_or_path"] == "org/tiny-llama"
    for name in ("peft", "ours"):
        card = (tmp_path / name / "README.md").read_text()
        assert "library_name: peft" in card and "- base_model:adapter:org/tiny-llama" in card, name
    # each loads the other's directory, with equal outputs
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert _rel(back(input_ids=IDS).logits, theirs(input_ids=IDS).logits) < 1e-5


def test_lm_head_target_saves_its_base_weight_as_peft(tmp_path):
    base = tiny_gpt2()
    kw = {"target_modules": ["c_attn", "lm_head"], "vector_length": 16, "num_vectors": 8}
    theirs, ours = _pair(base, **kw)
    for lib, model in (("peft", theirs), ("ours", ours)):
        with pytest.warns(UserWarning, match="save_embedding_layers"):
            model.save_pretrained(tmp_path / lib)
    assert _files(tmp_path / "ours") == _files(tmp_path / "peft")
    assert "base_model.model.lm_head.base_layer.weight" in _files(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "small", save_embedding_layers=False)
    assert "base_model.model.lm_head.base_layer.weight" not in _files(tmp_path / "small")


# ---------------------------------------------------------------------------- loading options
def test_from_pretrained_options(tmp_path):
    _, ours = _pair(_mlp(), **MLP_KW)
    ours.save_pretrained(tmp_path)
    config = vp.VBLoRAConfig(**MLP_KW)
    loaded = vp.PeftModel.from_pretrained(
        _mlp(),
        tmp_path,
        config=config,
        torch_device="cpu",
        low_cpu_mem_usage=True,
        autocast_adapter_dtype=True,
    )
    assert loaded.peft_config["default"] is config
    loaded.load_adapter(tmp_path, "other", torch_device="cpu", low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(loaded(X), ours(X))
    with pytest.raises(ValueError, match="move the model"):
        vp.PeftModel.from_pretrained(_mlp(), tmp_path, torch_device="meta")
    with pytest.raises(TypeError, match="unexpected"):
        vp.PeftModel.from_pretrained(_mlp(), tmp_path, not_an_option=1)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_as_peft(autocast):
    dtypes = {}
    for lib, module in LIBS.items():
        model = module.get_peft_model(
            _mlp().to(torch.bfloat16), module.VBLoRAConfig(**MLP_KW), autocast_adapter_dtype=autocast
        )
        bank = model.base_model.vblora_vector_bank["default"]
        dtypes[lib] = bank.dtype
    assert dtypes["vblora"] == dtypes["peft"] == (torch.float32 if autocast else torch.bfloat16)


# ---------------------------------------------------------------------------- unload and merge
@pytest.mark.parametrize("merge_first", [False, True])
def test_unload_as_peft(merge_first):
    theirs, ours = _pair(_mlp(), **MLP_KW, modules_to_save=["lin3"])
    results = {}
    for lib, model in (("peft", theirs), ("vblora", ours)):
        if merge_first:
            model.merge_adapter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the PEFT surface's unload matches PEFT: no warning
            plain = model.unload()
        with torch.no_grad():
            results[lib] = plain(X)
    assert _rel(results["vblora"], results["peft"]) < 1e-5


def test_vblora_unload_returns_the_original_model_and_says_so():
    base = _mlp()
    with torch.no_grad():
        expected = base(X)
    model = VBLoRAModel(base, vp.VBLoRAConfig(**MLP_KW, modules_to_save=["lin3"]))
    with torch.no_grad():
        model.model.lin3.modules_to_save["default"].weight.add_(1.0)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="PEFT's unload"):
        plain = model.unload()
    with torch.no_grad():
        assert torch.allclose(plain(X), expected, atol=1e-6)


# ---------------------------------------------------------------------------- PeftModel surface
def test_peft_model_attributes_match():
    theirs, ours = _pair(_mlp(), **MLP_KW)
    for model in (theirs, ours):
        assert model.base_model.model.lin3 is model.lin3  # forwarding, one level
        assert isinstance(model.get_base_model(), MLP)
        assert model.prefix == "vblora_"
        assert model.base_model.vblora_vector_bank["default"].shape == (6, 2)
        layer = model.base_model.model.lin0
        assert layer.vblora_logits_A["default"].shape == (2, 5, 6)
        assert layer.vblora_logits_B["default"].shape == (10, 2, 6)
        assert layer.active_adapters == ["default"] or layer.active_adapters == ("default",)
        assert not layer.disable_adapters
        assert callable(model.push_to_hub)
    assert torch.equal(
        ours.base_model.model.lin0.vblora_logits_A["default"],
        theirs.base_model.model.lin0.vblora_logits_A["default"],
    )


def test_layer_enable_adapters_as_peft():
    theirs, ours = _pair(_mlp(), **MLP_KW)
    outs = {}
    for lib, model in (("peft", theirs), ("vblora", ours)):
        model.base_model.model.lin0.enable_adapters(False)
        with torch.no_grad():
            outs[lib] = model(X)
    assert _rel(outs["vblora"], outs["peft"]) < 1e-5


def test_config_surface_as_peft(tmp_path):
    for lib, module in LIBS.items():
        config = module.VBLoRAConfig(**MLP_KW, task_type="SEQ_CLS")
        assert config.peft_type == peft.PeftType.VBLORA and not config.is_prompt_learning
        config.save_pretrained(tmp_path / lib)
        assert module.VBLoRAConfig.from_pretrained(tmp_path / lib).to_dict() == config.to_dict()
        data = module.VBLoRAConfig.from_json_file(tmp_path / lib / "adapter_config.json")
        assert data == json.loads((tmp_path / lib / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "vblora" / "adapter_config.json").read_text())
    assert ours["peft_version"] == peft.__version__
    assert peft.PeftConfig.from_pretrained(tmp_path / "vblora").peft_type == peft.PeftType.VBLORA


def test_error_types_match():
    for module in LIBS.values():
        with pytest.raises(ValueError, match="Invalid task type"):
            module.VBLoRAConfig(task_type="not-a-task")
        with pytest.raises(ValueError):
            module.get_peft_model(_mlp(), module.VBLoRAConfig(target_modules=["lin0"], vector_length=3))
        model = module.get_peft_model(_mlp(), module.VBLoRAConfig(**MLP_KW))
        with pytest.raises(ValueError):
            model.set_adapter("missing")
        with pytest.raises(ValueError):
            model.delete_adapter("missing")


def test_seq2seq_generate_refuses_positional_input_ids_as_peft():
    kw = {"target_modules": ["q", "v"], "vector_length": 16, "num_vectors": 8, "task_type": "SEQ_2_SEQ_LM"}
    for module in LIBS.values():
        model = module.get_peft_model(tiny_t5(), module.VBLoRAConfig(**kw))
        with pytest.raises(TypeError):
            model.generate(IDS, max_new_tokens=2)
        assert model.generate(input_ids=IDS, max_new_tokens=2).shape[0] == 2
