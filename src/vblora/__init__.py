"""vblora: VB-LoRA (vector-bank LoRA) for PyTorch and Hugging Face models."""

from .core.config import VBLoRAConfig
from .core.routing import BASE_ADAPTER
from .files import export_lora, load_compact, save_compact
from .layers.bnb import prepare_model_for_kbit_training
from .model import VBLoRAModel, get_vblora_model
from .optim import optimizer_param_groups
from .version import __version__ as __version__

__all__ = [
    "BASE_ADAPTER",
    "VBLoRAConfig",
    "VBLoRAModel",
    "export_lora",
    "get_vblora_model",
    "load_compact",
    "optimizer_param_groups",
    "prepare_model_for_kbit_training",
    "save_compact",
]
