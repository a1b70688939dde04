"""vblora: VB-LoRA (vector-bank LoRA) for PyTorch and Hugging Face models."""

from .config import VBLoRAConfig
from .model import VBLoRAModel, get_vblora_model
from .optim import optimizer_param_groups

__all__ = [
    "VBLoRAConfig",
    "VBLoRAModel",
    "get_vblora_model",
    "optimizer_param_groups",
]
__version__ = "0.1.0"
