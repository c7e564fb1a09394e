"""frugal_spin: SPIN (self-play fine-tuning) restricted to LoRA adapters on a 4-bit base."""

__version__ = "0.1.0"
