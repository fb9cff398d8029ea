import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm.config import ConfigError, ModelConfig, load_config, model_config
from llm.model import build_model


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_quickstart_loads_with_overrides():
    cfg = load_config("configs/quickstart.yaml", ["optim.lr=3e-4", "train.max_steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.model.d_model == 256  # from the model/small.yaml include


def test_includes_merge_in_order(tmp_path):
    write(tmp_path, "base.yaml", "model: {d_model: 64, n_heads: 2}\ntrain: {max_steps: 5}\n")
    top = write(tmp_path, "top.yaml", "defaults: [base.yaml]\ntrain: {max_steps: 9}\n")
    cfg = load_config(top)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.max_steps) == (64, 2, 9)


@pytest.mark.parametrize("override, key, expected", [
    ("optim.lrr=1", "optim.lrr", "allowed here: lr"),
    ("train.max_steps=abc", "train.max_steps", "Integer"),
    ("model.mixer=nope", "model.mixer", "registered: "),
    ("model.layer_pattern=[softmax,nope]", "model.layer_pattern[1]", "unknown mixer"),
    ("model.n_heads=5", "model.d_model=256", "not divisible"),
    ("model.n_kv_heads=3", "model.n_kv_heads=3", "must divide"),
    ("train.micro_batch_size=5", "train.global_batch_size=16", "multiple"),
    ("train.zero_stage=4", "train.zero_stage", "0, 1, 2 or 3"),
    ("optim.schedule=linear", "optim.schedule", "cosine, wsd, constant"),
    ("model.mixer_args.softmax.foo=1", "model.mixer_args.softmax.foo", "options"),
    ("model.mixer_args.nope.x=1", "model.mixer_args.nope", "unknown mixer"),
    ("optim.groups.attn.weight_decay=0", "optim.groups.attn", "qk, vo"),
    ("train.resume=/no/such/dir", "train.resume", "auto"),
    ("train.stop_at_step=0", "train.stop_at_step", "1..train.max_steps"),
    ("train.activation_checkpointing=half", "train.activation_checkpointing", "none, full or every:N"),
    ("train.activation_checkpointing=every:0", "train.activation_checkpointing", "N >= 1"),
    ("train.compile=maybe", "train.compile", "not a valid bool"),
])
def test_bad_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert key in str(e.value) and expected in str(e.value)


def test_compile_is_refused_with_zero3():
    with pytest.raises(ConfigError, match="train.compile with train.zero_stage=3"):
        load_config("configs/quickstart.yaml", ["train.compile=true", "train.zero_stage=3"])
    load_config("configs/quickstart.yaml", ["train.compile=true", "train.zero_stage=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="include 'nope.yaml' not found"):
        load_config(write(tmp_path, "a.yaml", "defaults: [nope]\n"))
    with pytest.raises(ConfigError, match="cycle"):
        write(tmp_path, "b.yaml", "defaults: [c.yaml]\n")
        load_config(write(tmp_path, "c.yaml", "defaults: [b.yaml]\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config("configs/quickstart.yaml", ["optim.lr"])


def test_build_model_accepts_every_config_form():
    fields = {"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2}
    models = [build_model(fields), build_model(OmegaConf.create(fields)), build_model(ModelConfig(**fields))]
    assert len({m.num_params() for m in models}) == 1
    assert model_config({}).mixer == "softmax"  # missing fields take their defaults


def test_includes_fall_back_to_the_config_root(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parent.parent
    top = write(tmp_path, "top.yaml", "defaults: [model/small.yaml]\n")
    monkeypatch.chdir(repo)  # not next to top.yaml: found under ./configs
    assert load_config(top).model.d_model == load_config("configs/model/small.yaml").model.d_model
    (tmp_path / "root" / "model").mkdir(parents=True)
    write(tmp_path / "root" / "model", "small.yaml", "model: {d_model: 48, n_heads: 2}\n")
    monkeypatch.setenv("LLM_CONFIG_ROOT", str(tmp_path / "root"))  # the env var replaces ./configs
    assert load_config(top).model.d_model == 48
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLM_CONFIG_ROOT")
    with pytest.raises(ConfigError, match="LLM_CONFIG_ROOT"):
        load_config(top)


def test_the_model_and_optimizer_do_not_import_the_config_loader():
    code = "import sys, llm.model, llm.optim, llm.ops.attention, llm.flops; assert 'llm.config' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("override, expected", [
    ("optim.weight_decay=-1", ">= 0"),
    ("optim.grad_clip=-1", ">= 0"),
    ("optim.betas=[1.0,0.95]", "0 <= beta < 1"),
    ("optim.betas=[0.9,-0.1]", "0 <= beta < 1"),
    ("optim.betas=[0.9]", "[beta1, beta2]"),
    ("optim.min_lr_ratio=1.5", "0 <= value <= 1"),
    ("optim.lr=inf", "> 0"),
    ("optim.lr=nan", "> 0"),
    ("optim.lr=0", "> 0"),
    ("optim.eps=0", "> 0"),
    ("optim.warmup_steps=-1", ">= 0"),
    ("optim.decay_fraction=0", "0 < value <= 1"),
    ("optim.groups.qk.weight_decay=-0.1", ">= 0"),
    ("optim.groups.qk.lr_scale=0", "> 0"),
    ("model.mlp_hidden=0", "> 0, or null"),
    ("model.init_std=0", "> 0"),
    ("model.rope_theta=-1", "> 0"),
    ("model.norm_eps=0", "> 0"),
    ("model.vocab_size=0", "> 0"),
    ("model.kernels=cuda", "auto, torch, fla"),
    ("eval.windows=-1", "(0 = the whole val split)"),
    ("train.dist_timeout=0", "seconds > 0"),
    ("train.time_limit=0", "seconds > 0, or null"),
    ("train.seed=-1", ">= 0"),
    ("train.z_loss=-1", ">= 0"),
    ("data.bi_induct.seed=-1", ">= 0"),
    ("data.bi_induct.rate=1", "0 <= value < 1"),
    ("logging.peak_flops=0", "> 0, or null"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, expected):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert str(e.value).startswith(f"{key}: got ") and expected in str(e.value)


def test_boundary_values_still_load():
    cfg = load_config("configs/quickstart.yaml", [
        "eval.windows=0", "optim.weight_decay=0", "optim.grad_clip=0", "optim.betas=[0,0.999]",
        "optim.min_lr_ratio=1", "optim.warmup_steps=0", "train.seed=0", "train.time_limit=null",
        "model.mlp_hidden=null"])
    assert cfg.eval.windows == 0 and list(cfg.optim.betas) == [0, 0.999]


def test_mixer_args_of_an_unused_mixer_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["model.mixer_args.mesa.cg_steps=3"])
    assert "model.mixer_args.mesa" in str(e.value) and "layers use: softmax" in str(e.value)
    hybrid = ["model.layer_pattern=[gated_deltanet,softmax]", "model.mixer_args.gated_deltanet.expand_v=1"]
    assert load_config("configs/quickstart.yaml", hybrid).model.mixer_args.gated_deltanet.expand_v == 1
    with pytest.raises(ConfigError, match="layers use: gated_deltanet, softmax"):
        load_config("configs/quickstart.yaml", hybrid + ["model.mixer_args.pdssm.state_size=4"])
    # build_model itself takes options of mixers it does not use (a shared set of defaults)
    build_model({"vocab_size": 50, "d_model": 32, "n_layers": 1, "n_heads": 2, "mixer_args": {"mesa": {}}})


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=[1,2", "not valid YAML"),
    ("optim.betas={a: 1", "not valid YAML"),
    ("train..max_steps=3", "non-empty names"),
    ("train.=3", "non-empty names"),
    ("=3", "non-empty names"),
])
def test_malformed_overrides_name_themselves(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert f"override {override!r}" in str(e.value) and expected in str(e.value)
    assert "allowed here" not in str(e.value)


def test_overrides_apply_in_order():
    cfg = load_config("configs/quickstart.yaml", ["optim.betas=[0.8,0.9]", "optim.lr=1e-4", "optim.betas=[0.5,0.6]"])
    assert list(cfg.optim.betas) == [0.5, 0.6] and cfg.optim.lr == 1e-4
