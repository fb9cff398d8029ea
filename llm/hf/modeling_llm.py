"""`trust_remote_code` modeling file of `llm_gpt` exports (momentum attention, PD-SSM, hybrids
without a stock format): `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

It builds the model with the `llm` package (which must be installed: pip install mixer-gpt) from
the model fields the export recorded in config.json, so there is one implementation of every mixer.
Generation through `model.generate` recomputes the whole prefix each step (no HF cache); the
recurrent caches are `python -m llm generate DIR`'s.
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class LLMConfig(PretrainedConfig):
    model_type = "llm_gpt"

    def __init__(self, llm_export=None, **kwargs):
        self.llm_export = llm_export or {}
        super().__init__(**kwargs)


class LLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        try:
            from llm.model import build_model
        except ImportError as e:
            raise ImportError(f"{type(self).__name__} runs the `llm` package's model; install it "
                              f"(pip install mixer-gpt): {e}") from None
        if "model" not in config.llm_export:
            raise ValueError("config.json: llm_export.model (the model fields) is missing")
        with torch.device("cpu"):  # for real, also where transformers builds on the meta device
            self.model = build_model(config.llm_export["model"])
        # The non-persistent buffers (rotary frequencies, fixed gammas, start states) are not in
        # the checkpoint, and transformers re-allocates them empty when it loads one.
        self._built_buffers = {id(mod): {name: b.clone() for name, b in mod.named_buffers(recurse=False)}
                               for mod in self.model.modules()}
        self.post_init()

    def _init_weights(self, module):
        # The weights come from the checkpoint; build_model has initialized the rest.
        for name, value in self._built_buffers.get(id(module), {}).items():
            module.get_buffer(name).copy_(value)

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
