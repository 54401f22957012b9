"""Optimizers for selective parameter updates."""
from .masked_adamw import MaskedAdamW

__all__ = ["MaskedAdamW"]
