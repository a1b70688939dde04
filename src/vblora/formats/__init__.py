"""Adapter files: PEFT directories, compact files and LoRA export; reading, checking, atomic writing.

Nothing here imports the model: loaders return checked tensors that the model applies.
"""
