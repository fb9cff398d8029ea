from llm.model.gpt import GPT, build_model, layer_mixers
from llm.model.spec import ModelConfig, ModelSpec, model_spec

__all__ = ["GPT", "ModelConfig", "ModelSpec", "build_model", "layer_mixers", "model_spec"]
