"""Decoder-only GPT: token embedding -> blocks (mixer chosen per layer) -> RMSNorm -> tied head."""
import math

import torch
from torch import nn

from llm.config import mixer_args, model_config
from llm.model.block import Block
from llm.model.layers import RMSNorm
from llm.model.mixers import MIXERS
from llm.model.roles import set_role


def layer_mixers(cfg) -> list[str]:
    """The mixer name of each layer: `layer_pattern` cycled over the layers, or `mixer` everywhere."""
    pattern = list(cfg.layer_pattern or [cfg.mixer])
    return [pattern[i % len(pattern)] for i in range(cfg.n_layers)]


def mlp_hidden(cfg) -> int:
    return cfg.mlp_hidden or 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = set_role(nn.Embedding(cfg.vocab_size, cfg.d_model), "embed")
        self.blocks = nn.ModuleList(
            Block(cfg, MIXERS[name](cfg, i, mixer_args(cfg, name)), mlp_hidden(cfg))
            for i, name in enumerate(layer_mixers(cfg)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else set_role(
            nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), "embed")
        self._init_weights()

    def _init_weights(self):
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "_residual_out", False) else 1.0
                nn.init.normal_(m.weight, std=std * scale)
                if m.bias is not None and not getattr(m, "_keep_bias_init", False):
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=std)

    def logits(self, h):
        h = self.norm(h)
        return h @ self.embed.weight.t() if self.head is None else self.head(h)

    def forward(self, input_ids):
        """input_ids [B, T] -> logits [B, T, vocab]."""
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.logits(h)

    @torch.no_grad()
    def init_cache(self, batch_size: int):
        return [block.mixer.init_cache(batch_size) for block in self.blocks]

    def forward_step(self, input_ids, cache):
        """Continue from `cache` over input_ids [B, t]; returns (logits [B, t, vocab], new cache)."""
        h = self.embed(input_ids)
        new_cache = []
        for block, c in zip(self.blocks, cache):
            h, c = block.forward_step(h, c)
            new_cache.append(c)
        return self.logits(h), new_cache

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def build_model(model_cfg) -> GPT:
    """A GPT from a ModelConfig, a DictConfig or a plain dict of model fields."""
    return GPT(model_config(model_cfg))
