"""Which modules get adapted: PEFT's matching semantics, and the errors for bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import MLP, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from vblora import VBLoRAConfig, get_vblora_model
from vblora.layers import ModulesToSaveWrapper, VBLoRALayer


def adapted(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, VBLoRALayer)]


def cfg(**kwargs) -> VBLoRAConfig:
    return VBLoRAConfig(**{"vector_length": 16, "num_vectors": 8, **kwargs})


def test_list_matches_exact_name_and_suffix_only() -> None:
    model = get_vblora_model(tiny_llama(), cfg(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert adapted(model.model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    # "proj" is no suffix after a dot of any name: nothing matches.
    with pytest.raises(ValueError, match="matched no module"):
        get_vblora_model(tiny_llama(), cfg(target_modules=["proj"]))


def test_regex_is_a_full_match() -> None:
    model = get_vblora_model(tiny_llama(), cfg(target_modules=r".*\.1\.self_attn\.(k|v)_proj"))
    assert adapted(model.model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_skips_the_output_head() -> None:
    model = get_vblora_model(tiny_llama(), cfg(target_modules="all-linear"))
    names = adapted(model.model)
    assert len(names) == 14 and "lm_head" not in names


def test_all_linear_skips_modules_to_save() -> None:
    model = get_vblora_model(
        tiny_bert(), cfg(target_modules="all-linear", modules_to_save=["classifier"], vector_length=2)
    )
    names = adapted(model.model)
    assert "classifier" not in names and "bert.pooler.dense" in names


def _llama_classifier() -> nn.Module:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_llama().config).eval()


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
@pytest.mark.parametrize("build", [tiny_bert, _llama_classifier], ids=["bert", "llama"])
def test_all_linear_on_a_classifier_targets_what_peft_targets(build, task_type) -> None:
    """With task_type SEQ_CLS, all-linear leaves the classifier head (score/classifier) out, as
    PEFT does; without it, the head is a linear layer like any other."""
    from peft import VBLoRAConfig as PeftVBLoRAConfig
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = {"target_modules": "all-linear", "task_type": task_type, "vector_length": 2, "num_vectors": 8}
    ours = adapted(get_vblora_model(build(), VBLoRAConfig(**settings)).model)
    theirs = get_peft_model(build(), PeftVBLoRAConfig(**settings)).base_model.model
    peft_names = [n for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)]
    assert ours == peft_names
    head = "classifier" if build is tiny_bert else "score"
    assert (head in ours) == (task_type is None)


def test_modules_to_save_that_match_nothing_are_refused_before_any_change() -> None:
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"modules_to_save \['clasifier'\] matched no module .*'classifier'"):
        get_vblora_model(base, cfg(target_modules=["query"], modules_to_save=["clasifier"]))
    assert adapted(base) == []
    # one of several names is enough: PEFT writes ["classifier", "score"] for any classifier
    model = get_vblora_model(
        tiny_bert(), cfg(target_modules=["query"], modules_to_save=["classifier", "score"])
    )
    assert isinstance(model.model.classifier, ModulesToSaveWrapper)


def test_exclude_modules() -> None:
    model = get_vblora_model(
        tiny_llama(), cfg(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    )
    assert not any(n.endswith(("down_proj", "o_proj")) for n in adapted(model.model))
    model = get_vblora_model(tiny_llama(), cfg(target_modules="all-linear", exclude_modules=r".*mlp.*"))
    assert not any(".mlp." in n for n in adapted(model.model))


def test_layers_to_transform_and_pattern() -> None:
    model = get_vblora_model(tiny_llama(), cfg(target_modules=["q_proj", "v_proj"], layers_to_transform=1))
    assert adapted(model.model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = get_vblora_model(
        tiny_gpt2(), cfg(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h")
    )
    assert adapted(model.model) == ["transformer.h.0.attn.c_attn"]


class _Stages(nn.Module):
    """Layers under a name none of the usual patterns knows (``enc.stages.N``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.stages = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.enc.stages:
            x = stage(x)
        return self.out(x)


def _peft_targets(model: nn.Module, **settings) -> tuple[list[str], list[str]]:
    """(adapted layers, modules_to_save wrappers) of PEFT's VB-LoRA for the same settings."""
    from peft import VBLoRAConfig as PeftVBLoRAConfig
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper as PeftWrapper

    theirs = get_peft_model(model, PeftVBLoRAConfig(**settings)).base_model.model
    layers = [n for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)]
    return layers, [n for n, m in theirs.named_modules() if isinstance(m, PeftWrapper)]


@pytest.mark.parametrize(
    "build, settings",
    [
        (tiny_llama, dict(target_modules=["q_proj", "lm_head"], layers_to_transform=[0])),  # a full name
        (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
        (tiny_gpt2, dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h")),
        (_Stages, dict(target_modules=["0", "1"], layers_to_transform=[1])),  # any <name>.<index>.
        (tiny_llama, dict(target_modules=["q_proj"], modules_to_save=["norm"])),  # a plain suffix
        (tiny_bert, dict(target_modules=["query"], modules_to_save=["classifier", "score"])),
    ],
    ids=["full-name", "int-layer", "pattern", "any-name", "save-suffix", "save-one-of-two"],
)
def test_layer_filter_and_modules_to_save_select_what_peft_selects(build, settings) -> None:
    """The same settings adapt and save the same modules in both libraries, so their checkpoints
    load in each other (PEFT's rules, including its quirks: ``"norm"`` saves ``input_layernorm``)."""
    settings = {"vector_length": 16, "num_vectors": 8, **settings}
    torch.manual_seed(0)
    ours = get_vblora_model(build(), VBLoRAConfig(**settings)).model
    saved = [n for n, m in ours.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert (adapted(ours), saved) == _peft_targets(build(), **settings)


def test_filters_that_leave_no_module_say_so() -> None:
    with pytest.raises(ValueError, match=r"matched 4 module\(s\).*layers_to_transform=5 .*left none"):
        get_vblora_model(tiny_llama(), cfg(target_modules=["q_proj", "v_proj"], layers_to_transform=5))
    with pytest.raises(ValueError, match=r"exclude_modules=\('q_proj',\).*left none"):
        get_vblora_model(tiny_llama(), cfg(target_modules=["q_proj"], exclude_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (tiny_llama, {"q_proj", "v_proj"}),
        (tiny_gpt2, {"c_attn"}),
        (tiny_bert, {"query", "value"}),
        (tiny_t5, {"q", "k", "v", "o", "wi", "wo"}),
    ],
)
def test_default_targets_per_model_type(builder, expected: set[str]) -> None:
    model = get_vblora_model(builder(), cfg())
    assert {n.rsplit(".", 1)[-1] for n in adapted(model.model)} == expected


def test_no_defaults_for_unknown_models() -> None:
    with pytest.raises(ValueError, match="no default targets"):
        get_vblora_model(MLP(), cfg(vector_length=2))


def test_no_match_lists_some_module_names() -> None:
    with pytest.raises(ValueError, match=r"matched no module of MLP.*lin0"):
        get_vblora_model(MLP(), cfg(target_modules=["nope"], vector_length=2))


def test_unsupported_module_type() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"0: Embedding is not supported"):
        get_vblora_model(model, cfg(target_modules=["0"], vector_length=2))


def test_indivisible_dimensions_name_module_shape_and_fix() -> None:
    base = MLP()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    message = r"lin0: `in_features` 10 must be divisible by `vector_length` 4.*e\.g\."
    with pytest.raises(ValueError, match=message):
        get_vblora_model(base, cfg(target_modules=["lin1", "lin0"], vector_length=4))
    # Nothing was wrapped and no weight changed.
    assert adapted(base) == []
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_linear_subclass_is_wrapped() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8))
    vm = get_vblora_model(model, cfg(target_modules=["0"], vector_length=4))
    assert isinstance(vm.model[0], VBLoRALayer) and isinstance(vm.model[0].base_layer, MyLinear)


def test_seq_cls_without_the_head_in_modules_to_save_warns_that_it_stays_frozen() -> None:
    """PEFT silently adds classifier/score to modules_to_save for SEQ_CLS; we keep the config as
    given, and say that the head is neither trained nor saved."""
    import warnings

    settings = {"target_modules": ["query"], "task_type": "SEQ_CLS"}
    with pytest.warns(UserWarning, match="classifier head 'classifier' is not in modules_to_save"):
        model = get_vblora_model(tiny_bert(), cfg(**settings))
    assert not model.model.classifier.weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_vblora_model(tiny_bert(), cfg(**settings, modules_to_save=["classifier"]))
        get_vblora_model(tiny_bert(), cfg(target_modules=["query"]))  # no task type: no guess
