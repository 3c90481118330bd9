"""zoexp: an experiment runner for memory-efficient zeroth-order fine-tuning of language models."""

__version__ = "0.1.0"
