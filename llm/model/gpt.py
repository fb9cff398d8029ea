"""Decoder-only GPT: token embedding -> blocks (mixer chosen per layer) -> RMSNorm -> tied head."""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.model.block import Block
from llm.model.layers import RMSNorm
from llm.model.loss import chunked_lm_loss
from llm.model.mixers import MIXERS
from llm.model.roles import set_role
from llm.model.spec import ModelSpec, model_spec
from llm.ops.utils import check_doc_start


def layer_mixers(model_cfg) -> list[str]:
    """The mixer name of each layer (`layer_pattern` cycled over the layers, or `mixer` everywhere),
    of a ModelSpec or any model config `model_spec` takes."""
    return [name for name, _ in model_spec(model_cfg).layers]


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = set_role(nn.Embedding(spec.vocab_size, spec.d_model), "embed")
        self.blocks = nn.ModuleList(Block(spec, MIXERS[name](spec, i, args))
                                    for i, (name, args) in enumerate(spec.layers))
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.head = None if spec.tie_embeddings else set_role(
            nn.Linear(spec.d_model, spec.vocab_size, bias=False), "embed")
        self.checkpointed: frozenset[int] = frozenset()  # blocks recomputed in backward (llm.model.wrap)
        self._init_weights()

    def _init_weights(self):
        """Every matrix ~ N(0, init_std) and biases 0, in module order; the projections that write
        into the residual stream (each mixer's `o_proj`, each MLP's `down`) get std / sqrt(2 L)
        (GPT-2); then each mixer's own `reset_parameters` (e.g. a bias it starts elsewhere)."""
        std = self.spec.init_std
        residual = {m for b in self.blocks for m in (b.mixer.o_proj, b.mlp.down)}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                scale = 1 / math.sqrt(2 * self.spec.n_layers) if m in residual else 1.0
                nn.init.normal_(m.weight, std=std * scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=std)
        for b in self.blocks:
            b.mixer.reset_parameters()

    @property
    def head_weight(self):
        return self.embed.weight if self.head is None else self.head.weight

    def logits(self, h):
        h = self.norm(h)
        return h @ self.embed.weight.t() if self.head is None else self.head(h)

    def forward(self, input_ids, doc_start=None, *, targets=None, z_loss: float = 0.0, loss_chunk: int = 512):
        """input_ids [B, T] -> logits [B, T, vocab]; with targets [B, T], (loss, ce) instead:
        `chunked_lm_loss` of the next-token targets (no full fp32 logits; ce without gradient).
        doc_start (bool [B, T], None: one document per row) is True where a document begins: no
        position sees anything before its document."""
        check_doc_start(doc_start, *input_ids.shape)
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, doc_start, use_reentrant=False) if i in self.checkpointed else block(h, doc_start)
        if targets is None:
            return self.logits(h)
        return chunked_lm_loss(self.norm(h), self.head_weight, targets, z_loss=z_loss, chunk=loss_chunk)

    @torch.no_grad()
    def init_cache(self, batch_size: int):
        return [block.mixer.init_cache(batch_size) for block in self.blocks]

    def forward_step(self, input_ids, cache, doc_start=None):
        """Continue from `cache` over input_ids [B, t]; returns (logits [B, t, vocab], new cache).
        doc_start [B, t] as in `forward` (a start resets what the cache carries)."""
        check_doc_start(doc_start, *input_ids.shape)
        h = self.embed(input_ids)
        new_cache = []
        for block, c in zip(self.blocks, cache):
            h, c = block.forward_step(h, c, doc_start)
            new_cache.append(c)
        return self.logits(h), new_cache

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def build_model(model_cfg) -> GPT:
    """A GPT from a ModelSpec, a ModelConfig, a DictConfig or a plain dict of model fields."""
    return GPT(model_spec(model_cfg))
