"""VBLoRATrainer: VB-LoRA's parameter groups in a transformers Trainer and adapter-only checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments

from conftest import tiny_bert
from vblora import VBLoRAConfig, VBLoRAModel, get_vblora_model
from vblora.hf import VBLoRATrainer

CONFIG = VBLoRAConfig(
    r=2, num_vectors=8, vector_length=16, target_modules=["query", "value"], modules_to_save=["classifier"]
)


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (n, 8), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2}
        for i in range(n)
    ]


def arguments(out: Path, **extra: object) -> TrainingArguments:
    settings = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 1,
        "learning_rate": 5e-3,
        "weight_decay": 0.1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**settings, **extra})


def trainer_for(out: Path, seed: int = 0, **extra: object) -> VBLoRATrainer:
    torch.manual_seed(seed)
    model = get_vblora_model(tiny_bert(), CONFIG)
    return VBLoRATrainer(
        model,
        arguments(out, **extra),
        train_dataset=dataset(),
        eval_dataset=dataset(8),
        logits_lr=0.05,
        bank_lr=0.01,
    )


def test_optimizer_uses_vblora_groups_and_checkpoints_hold_the_adapter_only(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path)
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {n: g["initial_lr"] for n, g in groups.items()} == {
        "vblora_logits": 0.05,
        "vblora_bank": 0.01,
        "other": 5e-3,
    }
    assert groups["vblora_logits"]["weight_decay"] == groups["vblora_bank"]["weight_decay"] == 0.0
    assert groups["other"]["weight_decay"] == 0.1
    final = tmp_path / "checkpoint-4"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    # the checkpoint is the trained adapter: reloading it reproduces the trained model's outputs
    reloaded = VBLoRAModel.from_pretrained(tiny_bert(), final)
    batch = {k: torch.stack([d[k] for d in dataset(4)]) for k in ("input_ids", "attention_mask")}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)


def test_resume_and_best_model_copy_the_checkpoint_into_the_live_adapter(tmp_path: Path) -> None:
    first = trainer_for(tmp_path / "a")
    first.train()
    saved = VBLoRAModel.from_pretrained(tiny_bert(), tmp_path / "a" / "checkpoint-2", is_trainable=True)

    second = trainer_for(tmp_path / "b", seed=1)
    live = second.model.vblora_banks["default"]
    bank_before = live.bank
    second._load_from_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    assert live.bank is bank_before  # copied in place: the optimizer keeps its parameters
    torch.testing.assert_close(live.bank, saved.vblora_banks["default"].bank)
    torch.testing.assert_close(live.logits, saved.vblora_banks["default"].logits)
    assert list(second.model.peft_config) == ["default"] and second.model.active_adapters == ["default"]
    assert live.logits.requires_grad and live.bank.requires_grad

    third = trainer_for(
        tmp_path / "c",
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    third.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert third.state.best_model_checkpoint is not None and third.state.global_step == 4


def test_resume_restores_every_active_adapter_by_name_with_its_biases(tmp_path: Path) -> None:
    """Adapters not named "default" live in checkpoint-N/<name>/; several may be active; one may
    train biases. Resuming from a checkpoint gives exactly the uninterrupted run's parameters."""

    def build() -> VBLoRAModel:
        torch.manual_seed(0)
        model = get_vblora_model(tiny_bert(), dataclasses.replace(CONFIG, bias="all"), "alice")
        model.add_adapter("bob", dataclasses.replace(CONFIG, target_modules=["key"], modules_to_save=None))
        model.add_adapter("frozen", dataclasses.replace(CONFIG, modules_to_save=None))
        model.set_adapter(["alice", "bob"])
        return model

    def trained(out: Path, steps: int, resume: Path | None = None) -> VBLoRAModel:
        model = build()
        args = arguments(out, max_steps=steps, num_train_epochs=2)
        trainer = VBLoRATrainer(model, args, train_dataset=dataset(), logits_lr=0.05, bank_lr=0.01)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return model

    straight = trained(tmp_path / "straight", 4)  # it saves checkpoint-2 on the way
    assert (tmp_path / "straight" / "checkpoint-2" / "alice" / "adapter_config.json").is_file()
    resumed = trained(tmp_path / "resumed", 4, resume=tmp_path / "straight" / "checkpoint-2")
    for name in ("alice", "bob", "frozen"):
        for tensor in ("bank", "logits"):
            a, b = getattr(straight.vblora_banks[name], tensor), getattr(resumed.vblora_banks[name], tensor)
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    biases = {n: p for n, p in straight.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert biases  # bias="all": trained, and restored exactly
    resumed_params = dict(resumed.named_parameters())
    for n, p in biases.items():
        torch.testing.assert_close(resumed_params[n], p, atol=0, rtol=0)
    assert resumed.active_adapters == ["alice", "bob"]


def test_trainer_gradient_checkpointing_and_neftune_reach_the_base_model(tmp_path: Path) -> None:
    for extra in ({"gradient_checkpointing": True}, {"neftune_noise_alpha": 5.0}):
        trainer = trainer_for(tmp_path / str(len(extra)), max_steps=2, **extra)
        trainer.train()
        assert trainer.state.global_step == 2
    model = trainer_for(tmp_path / "x").model
    assert model.get_input_embeddings() is model.model.bert.embeddings.word_embeddings
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_a_model_with_nothing_to_train_is_refused_with_the_reason(tmp_path: Path) -> None:
    trained = get_vblora_model(tiny_bert(), CONFIG)
    trained.save_pretrained(tmp_path / "adapter")
    loaded = VBLoRAModel.from_pretrained(tiny_bert(), tmp_path / "adapter")  # for inference
    with pytest.raises(ValueError, match=r"nothing to train.*is_trainable=True"):
        VBLoRATrainer(loaded, arguments(tmp_path / "out"), train_dataset=dataset())
