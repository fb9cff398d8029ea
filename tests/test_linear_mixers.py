"""DeltaNet, Gated DeltaNet and Mesa as model layers: cache, roles, options, FLOPs, configs (step form
and causality: tests/test_mixer_contract.py)."""
from pathlib import Path

import pytest
import torch

from llm.config import ConfigError, load_config
from llm.flops import forward_flops_per_token
from llm.model import build_model
from llm.model.roles import param_role
from stepping import run_in_pieces

LINEAR = ["deltanet", "gated_deltanet", "mesa"]
TINY = {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 2}
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "exp"


def tiny(mixer, **extra):
    torch.manual_seed(0)
    args = {name: {"chunk_size": 8} for name in LINEAR}  # several chunks in a 23-token window
    return build_model({**TINY, "mixer": mixer, "mixer_args": args, **extra}).eval()


@pytest.mark.parametrize("mixer", LINEAR)
def test_cache_has_constant_size(mixer):
    model = tiny(mixer)
    ids = torch.randint(0, 61, (1, 40))

    def shapes(cache):
        return [t.shape for layer in cache for v in layer.values() for t in (v if isinstance(v, tuple) else (v,))]

    with torch.no_grad():
        _, short = run_in_pieces(model, ids[:, :3], [3])
        _, long = run_in_pieces(model, ids, [1, 39])
    assert shapes(short) == shapes(long) == shapes(model.init_cache(1))


@pytest.mark.parametrize("mixer", LINEAR)
def test_trains_and_every_parameter_has_its_role(mixer):
    model = tiny(mixer).train()
    ids = torch.randint(0, 61, (2, 17))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    roles = {name.split("mixer.", 1)[1]: param_role(p) for name, p in model.blocks[0].named_parameters()
             if name.startswith("mixer.")}
    assert all(r is not None for r in roles.values())
    expected = {"q_proj.weight": "qk", "k_proj.weight": "qk", "v_proj.weight": "vo", "o_proj.weight": "vo",
                "b_proj.weight": "mixer_other", "q_conv.conv.weight": "mixer_other"}
    expected |= {"o_norm.g_proj.weight": "mixer_other"} if mixer != "mesa" else {}  # use_gate defaults
    if mixer == "gated_deltanet":
        expected |= {"A_log": "no_decay", "dt_bias": "no_decay", "a_proj.weight": "mixer_other"}
    expected |= {"lamb_param": "no_decay", "a_proj.bias": "no_decay"} if mixer == "mesa" else {}
    assert {n: roles[n] for n in expected} == expected


def test_gated_deltanet_decays_and_mesa_lamb_respects_its_bound():
    gdn = tiny("gated_deltanet").blocks[0].mixer
    x = torch.randn(1, 5, 32)
    g = -gdn.A_log.exp() * torch.nn.functional.softplus(gdn.a_proj(x) + gdn.dt_bias)
    assert (g < 0).all() and (g > -16 * 0.2).all()  # A in [1, 16], dt in [1e-3, 0.1] at init
    mesa = build_model({**TINY, "mixer": "mesa", "mixer_args": {"mesa": {"lamb_lower_bound": 0.5}}}).blocks[0].mixer
    with torch.no_grad():
        mesa.lamb_param.fill_(-50.0)
    assert torch.allclose(mesa.lamb(), torch.full_like(mesa.lamb(), 0.5))


def test_options_are_validated_at_load():
    with pytest.raises(ConfigError, match="mixer_args.deltanet"):
        build_model({**TINY, "mixer": "deltanet", "mixer_args": {"deltanet": {"expand_v": 0.3}}})
    with pytest.raises(ConfigError, match="mixer_args.mesa.*cg_steps"):
        build_model({**TINY, "mixer": "mesa", "mixer_args": {"mesa": {"cg_steps": 0}}})
    with pytest.raises(ConfigError, match="mixer_args.mesa"):
        build_model({**TINY, "mixer": "mesa", "mixer_args": {"mesa": {"conjugate_steps": 3}}})
    model = build_model({**TINY, "mixer": "gated_deltanet",
                         "mixer_args": {"gated_deltanet": {"head_dim": 8, "expand_v": 2.0, "use_gate": False}}})
    m = model.blocks[0].mixer
    assert (m.head_k, m.head_v, m.o_norm.g_proj) == (8, 16, None)
    assert m.q_proj.weight.shape == (16, 32) and m.v_proj.weight.shape == (32, 32)


def test_flops_count_the_state_and_cg_work():
    def flops(mixer, **args):
        cfg = {**TINY, "mixer": mixer, "mixer_args": {mixer: args}}
        return forward_flops_per_token(build_model(cfg).spec, 256)

    assert flops("gated_deltanet") > flops("deltanet") > 0
    assert flops("deltanet", chunk_size=64) > flops("deltanet", chunk_size=16)  # intra-chunk work grows with C
    d30, d60 = flops("mesa", cg_steps=30), flops("mesa", cg_steps=60)
    H, K, C = 2, 16, 64
    assert d60 - d30 == pytest.approx(2 * 30 * 2 * H * (K * K + 2 * C * K))  # 2 layers x 30 more CG steps


@pytest.mark.parametrize("name", [f"{m}_{s}" for m in LINEAR for s in ("quickstart", "125m", "350m")])
def test_experiment_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.mixer == name.rsplit("_", 1)[0]
    assert cfg.train.out_dir == f"runs/{name}"
    if not name.endswith("quickstart"):
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        assert cfg.data.seq_len == 2048 and 4e5 < tokens < 6e5 and cfg.train.zero_stage == 2
