"""Adapted layers: the wrapper every kind of base layer shares, the kinds, and modules_to_save."""

from .save import ModulesToSaveWrapper
from .wrapper import VBLoRALayer

__all__ = ["ModulesToSaveWrapper", "VBLoRALayer"]
