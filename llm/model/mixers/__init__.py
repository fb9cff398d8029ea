"""Mixer registry: importing this package registers every mixer family."""
from llm.model.mixers.base import MIXERS, Mixer, register_mixer
from llm.model.mixers import deltanet, mesa, momentum, pdssm, softmax  # noqa: F401  (each registers its mixers)

__all__ = ["MIXERS", "Mixer", "register_mixer"]
