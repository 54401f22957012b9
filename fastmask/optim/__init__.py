"""Optimizers for selective parameter updates."""
from .masked_adamw import MaskedAdamW, no_step_in_backward

__all__ = ["MaskedAdamW", "no_step_in_backward"]
