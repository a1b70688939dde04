"""``from vblora.hf import VBLoRATrainer``: the import path the README shows, kept stable; the
Trainer lives in :mod:`vblora.integrations.hf`. Importing this module imports transformers."""

from .integrations.hf import VBLoRATrainer

__all__ = ["VBLoRATrainer"]
