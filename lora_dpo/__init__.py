"""lora-dpo: Direct Preference Optimization of 4-bit LoRA models on one consumer GPU."""

__version__ = "0.1.0"
