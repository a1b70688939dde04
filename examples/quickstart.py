"""Wrap a tiny Llama with VB-LoRA, train it for a few steps and report what would be saved.

Run: python examples/quickstart.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vblora import VBLoRAConfig, get_vblora_model, optimizer_param_groups

torch.manual_seed(0)
base = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
config = VBLoRAConfig(r=4, num_vectors=64, vector_length=32, topk=2, target_modules="all-linear")
model = get_vblora_model(base, config)
model.print_trainable_parameters()
model.print_savable_parameters()

optimizer = torch.optim.AdamW(optimizer_param_groups(model, logits_lr=1e-2, bank_lr=1e-3))
batch = torch.randint(0, 256, (8, 32))  # one fixed batch: the loss must fall as the adapter fits it
for step in range(60):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0 or step == 59:
        print(f"step {step:3d}  loss {loss.item():.4f}")
