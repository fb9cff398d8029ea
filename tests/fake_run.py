"""A run directory without training: a config and one checkpoint in the layout llm.checkpoint reads."""
import json

import torch

from llm.config import build_config, save_config
from llm.model import build_model

TAG = "step_00000001"


def make_run(root, data_dir, model_fields: dict, seq_len: int, seed: int = 0):
    """Write RUN = root (config.yaml, checkpoints/TAG) for a model of `model_fields` (vocab 512, width
    32, 2 layers, 4 heads unless given) and return that model, in eval mode. Its weights are moved
    off their init values (ones, zeros), so a conversion that swaps or drops a tensor shows."""
    cfg = build_config({"model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, **model_fields},
                        "data": {"path": str(data_dir), "seq_len": seq_len}, "train": {"out_dir": str(root)}})
    save_config(cfg, root / "config.yaml")
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tag = root / "checkpoints" / TAG
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "complete.json").write_text(json.dumps({"step": 1}))
    (root / "checkpoints" / "latest").write_text(TAG)
    return model.eval()
