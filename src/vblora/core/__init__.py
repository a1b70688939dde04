"""The core: VB-LoRA's math, one adapter's state, the set of adapters and row routing (torch only)."""
