"""Fine-tune the packaged MiniLM on Rotten Tomatoes with VB-LoRA and a transformers ``Trainer``.

VBLoRATrainer gives the logits, the bank and the classifier head their own learning rates, and its
checkpoints (``checkpoint-N/``) hold the adapter directory instead of the whole model.
A small budget (2,000 sentences, one epoch, about a minute on 2 CPU cores); `vblora train` is the full demo.

Run: python examples/trainer_example.py [output folder]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from vblora import VBLoRAConfig, get_vblora_model
from vblora.hf import VBLoRATrainer
from vblora.training.data import load_rotten_tomatoes, minilm_path, split_examples

output = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/trainer-example")
torch.manual_seed(0)
hf_logging.set_verbosity_error()  # the classifier head is new on purpose: no load report

examples, labels = load_rotten_tomatoes()
train, test = split_examples(examples, test_size=1000, seed=0)  # the split `vblora train` uses
tokenizer = AutoTokenizer.from_pretrained(minilm_path())


def encode(rows):
    return [{**tokenizer(r.text, truncation=True, max_length=64), "labels": r.label} for r in rows]


base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(labels))
config = VBLoRAConfig(
    r=4,
    num_vectors=64,
    vector_length=128,
    target_modules=["query", "key", "value", "dense"],
    modules_to_save=["classifier"],
    save_only_topk_weights=True,  # for model.save_pretrained; the trainer's checkpoints keep full logits
)
model = get_vblora_model(base, config)
model.print_savable_parameters()

args = TrainingArguments(
    output_dir=str(output),
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    num_train_epochs=1,
    learning_rate=5e-3,  # the classifier head; the logits and bank rates are passed to the trainer
    lr_scheduler_type="linear",
    warmup_steps=0.06,  # a float is a fraction of the steps (transformers >= 5)
    eval_strategy="epoch",
    save_strategy="epoch",
    logging_steps=5,
    report_to="none",
    use_cpu=True,
)


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


trainer = VBLoRATrainer(
    model,
    args,
    train_dataset=encode(train[:2000]),
    eval_dataset=encode(test[:300]),
    data_collator=DataCollatorWithPadding(tokenizer),
    processing_class=tokenizer,
    compute_metrics=accuracy,
    logits_lr=5e-2,
    bank_lr=1e-2,
)
print("before training:", trainer.evaluate()["eval_accuracy"])
trainer.train()
print("after training:", trainer.evaluate()["eval_accuracy"])

checkpoint = sorted(output.glob("checkpoint-*"))[-1]
print(f"{checkpoint.name}/ holds:", sorted(p.name for p in checkpoint.iterdir()))
model.save_pretrained(output / "adapter")  # top-k, as the config says: inference only, tens of kB
print("top-k adapter:", (output / "adapter" / "adapter_model.safetensors").stat().st_size, "bytes")
