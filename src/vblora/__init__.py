"""vblora: VB-LoRA (vector-bank LoRA) for PyTorch and Hugging Face models."""

from .checkpoint import export_lora, load_compact, save_compact
from .config import VBLoRAConfig
from .model import VBLoRAModel, get_vblora_model
from .optim import optimizer_param_groups
from .serving import BASE_ADAPTER

__all__ = [
    "BASE_ADAPTER",
    "VBLoRAConfig",
    "VBLoRAModel",
    "export_lora",
    "get_vblora_model",
    "load_compact",
    "optimizer_param_groups",
    "save_compact",
]
__version__ = "0.1.0"
