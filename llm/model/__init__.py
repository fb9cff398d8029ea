from llm.model.gpt import GPT, build_model, layer_mixers

__all__ = ["GPT", "build_model", "layer_mixers"]
