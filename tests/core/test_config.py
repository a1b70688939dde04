"""VBLoRAConfig: PEFT's fields and defaults, validation at construction, JSON round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vblora import VBLoRAConfig


def test_defaults_match_peft() -> None:
    peft = pytest.importorskip("peft")
    ours, theirs = VBLoRAConfig(), peft.VBLoRAConfig()
    for name in [
        "r",
        "num_vectors",
        "vector_length",
        "topk",
        "target_modules",
        "exclude_modules",
        "save_only_topk_weights",
        "vblora_dropout",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
        "init_vector_bank_bound",
        "init_logits_std",
        "layers_to_transform",
        "layers_pattern",
    ]:
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -1}, "r must be a positive integer"),
        ({"topk": 0}, "topk must be a positive integer"),
        ({"topk": 5, "num_vectors": 4}, "topk=5 exceeds num_vectors=4"),
        ({"vector_length": 0}, "vector_length must be a positive integer"),
        ({"num_vectors": 2.5}, "num_vectors must be a positive integer"),
        ({"vblora_dropout": 1.0}, "vblora_dropout must be in"),
        ({"target_modules": [1, 2]}, "target_modules must be a list of module names or a regex"),
        ({"target_modules": 5}, "target_modules must be a list of module names or a regex"),
        ({"modules_to_save": ["classifier", None]}, "modules_to_save must be a list of module names"),
        ({"target_modules": "layers.(["}, "target_modules .* is not a valid regex"),
        ({"exclude_modules": "*proj"}, "exclude_modules .* is not a valid regex"),
        ({"vblora_dropout": -0.1}, "vblora_dropout must be in"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "cannot be used with a regex"),
        ({"layers_to_transform": [-1], "target_modules": ["q"]}, "indices >= 0"),
        ({"init_logits_std": -1.0}, "must be >= 0"),
        ({"save_only_topk_weights": "false"}, "save_only_topk_weights must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"init_logits_std": float("nan")}, "init_logits_std must be a finite number"),
        ({"vblora_dropout": "0.1"}, "vblora_dropout must be a finite number"),
        ({"target_modules": {"q_proj": 1}}, "target_modules must be a list of module names"),
        ({"layers_to_transform": 1.5, "target_modules": ["q"]}, "an index or a list of them"),
        ({"task_type": 3}, "task_type must be a string"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VBLoRAConfig(**kwargs)


def test_layers_to_transform_zero_is_allowed_with_pattern() -> None:
    cfg = VBLoRAConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert cfg.layers_to_transform == 0


def test_config_is_frozen_and_lists_become_tuples() -> None:
    cfg = VBLoRAConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    assert cfg.target_modules == ("q_proj", "v_proj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 8  # type: ignore[misc]


def test_dict_round_trip() -> None:
    cfg = VBLoRAConfig(r=8, target_modules=["a", "b"], layers_to_transform=[0, 2], task_type="CAUSAL_LM")
    data = cfg.to_dict()
    assert data["peft_type"] == "VBLORA"
    assert data["target_modules"] == ["a", "b"]
    assert VBLoRAConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert VBLoRAConfig.from_json(cfg.to_json()) == cfg


def test_reads_peft_adapter_config(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.VBLoRAConfig(r=3, num_vectors=64, vector_length=32, topk=3, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = VBLoRAConfig.from_dict(data)
    assert (ours.r, ours.num_vectors, ours.vector_length, ours.topk) == (3, 64, 32, 3)
    assert ours.target_modules == ("q_proj",)
    # And PEFT reads ours back.
    (tmp_path / "adapter_config.json").write_text(ours.to_json())
    again = peft.PeftConfig.from_pretrained(tmp_path)
    assert again.peft_type == "VBLORA" and again.topk == 3 and set(again.target_modules) == {"q_proj"}


def test_unknown_keys_warn_and_are_ignored() -> None:
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \[.some_future_field.\].*ignored"):
        cfg = VBLoRAConfig.from_dict({"r": 2, "some_future_field": 1, "peft_version": "x"})
    assert cfg.r == 2


def test_wrong_peft_type_is_refused() -> None:
    with pytest.raises(ValueError, match="not a VB-LoRA config"):
        VBLoRAConfig.from_dict({"peft_type": "LORA", "r": 8})


def test_reads_peft_in_memory_config_dict() -> None:
    """PEFT's to_dict() holds its PeftType enum, not the string the JSON file has."""
    peft = pytest.importorskip("peft")
    theirs = peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=["q_proj"])
    ours = VBLoRAConfig.from_dict(theirs.to_dict())
    assert (ours.r, ours.num_vectors, ours.target_modules) == (2, 16, ("q_proj",))
