"""Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""
from torch import nn

from llm.model.layers import RMSNorm, SwiGLU


class Block(nn.Module):
    def __init__(self, spec, mixer: nn.Module):
        super().__init__()
        self.mixer_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.mlp = SwiGLU(spec.d_model, spec.mlp_hidden)

    def forward(self, x, doc_start=None):
        x = x + self.mixer(self.mixer_norm(x), doc_start=doc_start)
        return x + self.mlp(self.mlp_norm(x))

    def forward_step(self, x, cache, doc_start=None):
        y, cache = self.mixer.forward_step(self.mixer_norm(x), cache, doc_start=doc_start)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache
