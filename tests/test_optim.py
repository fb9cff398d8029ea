"""Parameter groups (decoupled weight decay per role) and the stability levers: independent weight
decay, z-loss, QK-norm."""
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from llm.config import build_config, load_config
from llm.model import build_model
from llm.model.mixers import MIXERS
from llm.model.roles import param_role
from llm.optim import describe_groups, lr_schedule, param_groups
from llm.engine import ds_config, lm_loss

TINY = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4}
MODELS = {name: {**TINY, "mixer": name} for name in sorted(MIXERS)}
MODELS["hybrid"] = {**TINY, "n_layers": len(MIXERS), "layer_pattern": sorted(MIXERS)}


def config(optim=None, model=None, train=None):
    return build_config({"model": model or TINY, "optim": optim or {}, "train": train or {}})


def zero_gradient_step(optimizer, params):
    """One optimizer step with zero gradients: Adam's update is exactly zero, only decay acts."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()


def in_fresh_process(fn, *args):
    """fn(*args) in a new interpreter: DeepSpeed keeps its process groups in module globals, which
    outlive a torch.distributed teardown, so each process may set up engines only once."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def deepspeed_engine(cfg, model, max_steps=10):
    """A one-process DeepSpeed engine built as the trainer builds it (groups, config, schedule)."""
    from llm import distributed

    distributed.prepare_env()
    distributed.init(60)
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim), config=ds_config(cfg, 1, "fp32"),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.optim, max_steps)))
    return engine


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_in_exactly_one_group_by_its_role(name):
    model = build_model(MODELS[name])
    groups = param_groups(model, config({"weight_decay": 0.1}).optim)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert len({g["name"] for g in groups}) == len(groups)
    for g in groups:
        assert all(param_role(p) == g["name"] for p in g["params"])
        assert g["weight_decay"] == (0.0 if g["name"] == "no_decay" else 0.1)


def test_zero_gradient_step_decays_each_group_by_exactly_lr_wd():
    lr, wd = 0.01, 0.5
    cfg = config({"lr": lr, "weight_decay": wd, "groups": {"qk": {"weight_decay": 0.0}, "vo": {"lr_scale": 0.5}}})
    model = build_model(TINY)
    groups = param_groups(model, cfg.optim)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    zero_gradient_step(torch.optim.AdamW(groups), model.parameters())
    shrink = {"qk": 1.0, "no_decay": 1.0, "vo": 1 - 0.5 * lr * wd, "mlp": 1 - lr * wd, "embed": 1 - lr * wd}
    for g in groups:
        for p in g["params"]:
            torch.testing.assert_close(p.detach(), before[id(p)] * shrink[g["name"]], rtol=1e-7, atol=0)
    assert not torch.equal(model.blocks[0].mlp.down.weight, before[id(model.blocks[0].mlp.down.weight)])


def test_independent_wd_shrinks_by_schedule_times_wd_whatever_the_lr():
    wd = 0.01
    cfg = config({"lr": 0.02, "weight_decay": wd, "independent_wd": True, "warmup_steps": 4,
                  "groups": {"qk": {"lr_scale": 0.25}}})
    model = build_model(TINY)
    groups = param_groups(model, cfg.optim)
    assert {r["name"]: r["weight_decay"] for r in describe_groups(groups, cfg.optim)}["qk"] == pytest.approx(wd)
    schedule = lr_schedule(cfg.optim, 20)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    q, mlp = model.blocks[0].mixer.q_proj.weight, model.blocks[0].mlp.down.weight
    for step in range(3):  # warmup: schedule_t = (t + 1) / 4
        q_before, mlp_before = q.detach().clone(), mlp.detach().clone()
        zero_gradient_step(optimizer, model.parameters())
        scheduler.step()
        for p, old in ((q, q_before), (mlp, mlp_before)):
            torch.testing.assert_close(p.detach(), old * (1 - schedule(step) * wd), rtol=1e-7, atol=0)


def test_group_overrides_from_yaml_and_command_line_reach_the_optimizer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {vocab_size: 97, d_model: 32, n_layers: 2, n_heads: 4}\n"
                    "optim:\n  lr: 0.002\n  weight_decay: 0.05\n"
                    "  groups: {qk: {weight_decay: 0.0}, vo: {weight_decay: 0.3}}\n")
    cfg = load_config(path, ["optim.groups.vo.weight_decay=0", "optim.groups.mlp.lr_scale=0.5",
                             "optim.weight_decay=0.2"])
    optimizer = torch.optim.AdamW(param_groups(build_model(cfg.model), cfg.optim))
    got = {g["name"]: (g["weight_decay"], g["lr"]) for g in optimizer.param_groups}
    assert got == {"qk": (0.0, 0.002), "vo": (0.0, 0.002), "mlp": (0.2, 0.001), "embed": (0.2, 0.002),
                   "no_decay": (0.0, 0.002)}


def deepspeed_step_decays_by_group(stages):
    import deepspeed

    lr, wd = 0.01, 0.5
    for stage in stages:
        cfg = config({"lr": lr, "weight_decay": wd, "schedule": "constant", "warmup_steps": 0,
                      "groups": {"qk": {"weight_decay": 0.0}}},
                     train={"global_batch_size": 1, "micro_batch_size": 1, "zero_stage": stage})
        model = build_model(cfg.model)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        engine = deepspeed_engine(cfg, model)
        engine.backward(0 * engine(torch.randint(0, 97, (1, 8))).sum())  # zero gradients
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            for name, p in model.named_parameters():
                shrink = 1.0 if param_role(p) in ("qk", "no_decay") else 1 - lr * wd
                torch.testing.assert_close(p.detach(), before[name] * shrink, rtol=1e-6, atol=0,
                                           msg=lambda m: f"ZeRO-{stage} {name}: {m}")


@pytest.mark.slow
def test_deepspeed_step_decays_by_group():
    in_fresh_process(deepspeed_step_decays_by_group, (1, 3))


def test_z_loss_is_coef_times_mean_squared_logsumexp_and_changes_the_gradient():
    coef = 1e-2  # the paper's 1e-4 would drown in float32 rounding of the difference below
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[2, 0]])
    lse = torch.tensor([math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3)])
    loss, ce = lm_loss(logits, targets, coef)
    assert ce.item() == pytest.approx(((lse[0] - 3) + lse[1]).item() / 2)
    assert (loss - ce).item() == pytest.approx(coef * lse.pow(2).mean().item(), rel=1e-5)
    (with_z,) = torch.autograd.grad(loss, logits)
    (without,) = torch.autograd.grad(lm_loss(logits, targets)[0], logits)
    # d/dlogits of coef * mean(lse^2) = coef * 2 * lse * softmax / n_tokens
    expected = coef * 2 * lse[:, None] * logits.detach()[0].softmax(-1) / 2
    torch.testing.assert_close(with_z - without, expected[None], rtol=1e-3, atol=1e-9)
    assert (with_z - without).abs().max() > 1e-5


def test_qk_norm_gives_rows_of_rms_gain_and_bounds_the_attention_logits():
    x = 1000 * torch.randn(2, 7, TINY["d_model"])

    def max_score(mixer):
        q, k, _ = mixer.qkv(x)  # after RoPE, which preserves norms
        return (torch.einsum("bthd,bshd->bhts", q, k) * mixer.head_dim ** -0.5).abs().max().item(), q, k

    torch.manual_seed(0)
    normed = build_model({**TINY, "qk_norm": True}).blocks[0].mixer
    normed.q_norm.weight.data.fill_(2.0)
    normed.k_norm.weight.data.fill_(0.5)
    torch.manual_seed(0)
    plain = build_model(TINY).blocks[0].mixer
    with torch.no_grad():
        score, q, k = max_score(normed)
        rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
        torch.testing.assert_close(rms(q), torch.full_like(rms(q), 2.0), rtol=1e-4, atol=0)
        torch.testing.assert_close(rms(k), torch.full_like(rms(k), 0.5), rtol=1e-4, atol=0)
        bound = normed.head_dim ** 0.5 * 2.0 * 0.5  # Cauchy-Schwarz: |q.k| / sqrt(D) <= sqrt(D) gq gk
        assert score <= bound * (1 + 1e-4)
        assert max_score(plain)[0] > 10 * bound
