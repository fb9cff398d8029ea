"""GPT pretraining with swappable token mixers."""
__version__ = "0.1.0"
