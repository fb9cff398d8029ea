import pytest
import torch

from llm.config import ConfigError
from llm.model import build_model
from llm.model.roles import param_role


def make_mixer(n_kv_heads=None, **args):
    torch.manual_seed(0)
    model = build_model({"vocab_size": 11, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": n_kv_heads,
                         "mixer": "momentum", "mixer_args": {"momentum": {"learn_gamma": True, **args}}})
    mixer = model.blocks[0].mixer
    with torch.no_grad():  # a different gamma per kv head, so a mixed-up head shows
        mixer.gamma.copy_(torch.linspace(0.3, 1.7, mixer.n_kv_heads))
    return mixer


def explicit_shear(x, gamma, first):
    """x_t + gamma (x_t - x_{t-1}), one position at a time; x_{-1} = x_0 (repeat) or 0."""
    out = []
    for t in range(x.shape[1]):
        prev = x[:, t - 1] if t > 0 else (x[:, 0] if first == "repeat" else torch.zeros_like(x[:, 0]))
        out.append(x[:, t] + gamma[:, None] * (x[:, t] - prev))
    return torch.stack(out, 1)


@pytest.mark.parametrize("apply", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("first", ["repeat", "zero"])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_shear_matches_explicit_computation(apply, first, n_kv_heads):
    mixer = make_mixer(n_kv_heads, apply=apply, first=first)
    x = torch.randn(2, 9, 32)
    q, k, _ = mixer.project(x)
    gq = mixer.gamma.repeat_interleave(4 // mixer.n_kv_heads)
    if apply == "post_rope":
        q_ref = explicit_shear(mixer.rotary(q), gq, first)
        k_ref = explicit_shear(mixer.rotary(k), mixer.gamma, first)
    else:
        q_ref = mixer.rotary(explicit_shear(q, gq, first))
        k_ref = mixer.rotary(explicit_shear(k, mixer.gamma, first))
    q_out, k_out, _ = mixer.qkv(x)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)
    if first == "repeat":  # no shear at t = 0
        torch.testing.assert_close(q_out[:, 0], mixer.rotary(q)[:, 0])


@pytest.mark.parametrize("apply", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("first", ["repeat", "zero"])
def test_step_form_in_pieces_matches_parallel_form(apply, first):
    mixer = make_mixer(2, apply=apply, first=first)
    x = torch.randn(2, 13, 32)
    q_full, k_full, _ = mixer.qkv(x)
    y_full = mixer(x)
    cache, ys, qs, start = mixer.init_cache(2), [], [], 0
    for n in (1, 4, 1, 7):
        before = {key: v.clone() if torch.is_tensor(v) else v for key, v in cache.items()}
        qs.append(mixer.qkv(x[:, start:start + n], dict(cache))[0])
        y, new_cache = mixer.forward_step(x[:, start:start + n], cache)
        for key, v in before.items():  # the caller's cache is left as it was
            assert torch.equal(cache[key], v) if torch.is_tensor(v) else cache[key] == v
        cache = new_cache
        ys.append(y)
        start += n
    torch.testing.assert_close(torch.cat(qs, 1), q_full)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-5, rtol=1e-5)
    assert cache["pos"] == 13 and cache["k"].shape[1] == 13
    torch.testing.assert_close(cache["k_prev"], mixer.rotary(mixer.project(x)[1], 0)[:, -1:]
                               if apply == "post_rope" else mixer.project(x)[1][:, -1:])


def test_gamma_zero_is_softmax_attention():
    torch.manual_seed(0)
    cfg = {"vocab_size": 11, "d_model": 32, "n_layers": 2, "n_heads": 4}
    softmax = build_model(cfg)
    momentum = build_model({**cfg, "mixer": "momentum", "mixer_args": {"momentum": {"gamma": 0.0}}})
    momentum.load_state_dict(softmax.state_dict())
    ids = torch.randint(0, 11, (2, 10))
    torch.testing.assert_close(momentum(ids), softmax(ids), atol=0, rtol=0)
    shifted = build_model({**cfg, "mixer": "momentum"})
    shifted.load_state_dict(softmax.state_dict())
    assert (shifted(ids) - softmax(ids)).abs().max() > 1e-3


def test_gamma_parameter_roles_and_gradient():
    mixer = make_mixer()
    assert isinstance(mixer.gamma, torch.nn.Parameter) and param_role(mixer.gamma) == "no_decay"
    assert all(param_role(p) is not None for p in mixer.parameters())
    mixer(torch.randn(1, 6, 32)).sum().backward()
    assert mixer.gamma.grad.abs().min() > 0
    fixed = build_model({"d_model": 32, "n_heads": 4, "mixer": "momentum"}).blocks[0].mixer
    assert "gamma" not in dict(fixed.named_parameters()) and "gamma" not in fixed.state_dict()


@pytest.mark.parametrize("bad", [{"apply": "before_rope"}, {"first": "copy"}])
def test_bad_options_name_the_key(bad):
    with pytest.raises(ConfigError, match="mixer_args.momentum: " + list(bad)[0]):
        build_model({"mixer": "momentum", "mixer_args": {"momentum": bad}})
