"""Mixer registry: importing this package registers every mixer family."""
from llm.model.mixers.base import MIXERS, Mixer, register_mixer
from llm.model.mixers import softmax  # noqa: F401  (registers softmax)

__all__ = ["MIXERS", "Mixer", "register_mixer"]
