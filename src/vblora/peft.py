"""PEFT's names for VB-LoRA: ``from vblora.peft import get_peft_model, PeftModel, VBLoRAConfig``
runs code written for PEFT's VB-LoRA (see :mod:`vblora.integrations.peft_api`)."""

from .integrations.peft_api import *  # noqa: F403
from .integrations.peft_api import __all__ as __all__
