"""`python -m llm export RUN --format hf`: stock `transformers` loads the export with the logits of
our model (Llama, Qwen3, the trust_remote_code bundle), the tokenizer encodes as ours, the export
reads back (load_exported, load_run) and a Llama / Qwen3 checkpoint made by transformers imports
(load_hf_softmax); fla formats keep fla's names and shapes."""
import json

import pytest
import torch

from fake_run import TAG, make_run
from llm.__main__ import main as llm_main
from llm.model import build_model

transformers = pytest.importorskip("transformers")

SEQ_LEN = 48
SHAPES = {  # model type -> our model fields (vocab and sizes added below)
    "llama": {"mixer": "softmax"},
    "qwen3": {"mixer": "softmax", "qk_norm": True, "n_kv_heads": 2, "tie_embeddings": False},
    "llm_gpt": {"layer_pattern": ["momentum", "pdssm"], "mixer_args": {"momentum": {"learn_gamma": True}}},
}


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp(f"run_{request.param}")
    model = make_run(root, data_dir, SHAPES[request.param], SEQ_LEN)
    out = root / "hf"
    llm_main(["export", str(root), "--out", str(out), "--format", "hf"])
    return request.param, model, out, root


def test_transformers_loads_the_export_with_our_logits(exported):
    from transformers import AutoModelForCausalLM

    fmt, model, out, _ = exported
    assert json.loads((out / "config.json").read_text())["model_type"] == fmt
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=fmt == "llm_gpt").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                 "llm_gpt": "LLMForCausalLM"}[fmt]
    x = torch.randint(0, 512, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    print(f"{fmt}: max |logit diff| through transformers {diff:.2e}")
    assert diff < 1e-5


def test_tokenizer_encodes_as_ours_after_eos(exported, data_dir):
    from transformers import AutoTokenizer, GenerationConfig

    from llm.data import load_tokenizer

    fmt, _, out, _ = exported
    ours = load_tokenizer(data_dir)
    theirs = AutoTokenizer.from_pretrained(out, trust_remote_code=fmt == "llm_gpt")
    text = "def f(x):\n    return x  +  12345 <sep> héllo\n\n  end"
    assert theirs(text).input_ids == theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    # training joins documents with EOS and never shows BOS: </s> is what precedes a document
    assert theirs.bos_token_id == theirs.eos_token_id == ours.eos_id
    assert theirs.decode(ours.encode(text)) == text
    assert GenerationConfig.from_pretrained(out).eos_token_id == ours.eos_id


def test_export_reads_back_exactly(exported, data_dir):
    from llm.eval import load_run
    from llm.export import load_exported

    _, model, out, _ = exported
    x = torch.randint(0, 512, (1, SEQ_LEN))
    with torch.no_grad():
        assert torch.equal(load_exported(out)(x), model(x))
    back, cfg, tok, tag = load_run(str(out))  # what `llm eval` / `llm generate` open
    assert (cfg.data.seq_len, cfg.data.path, tag, tok.vocab_size) == (SEQ_LEN, str(data_dir), TAG, 512)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("fmt", ["llama", "qwen3"])
def test_a_transformers_checkpoint_imports_for_training(fmt, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm.export import load_hf_softmax
    from llm.hf import softmax_fields

    extra = {"qwen3": {"num_key_value_heads": 2, "tie_word_embeddings": False}}.get(fmt, {"tie_word_embeddings": True})
    config = AutoConfig.for_model(fmt, vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, head_dim=8, rms_norm_eps=1e-5,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    for p in hf.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    fields = softmax_fields(json.loads((tmp_path / "config.json").read_text()))
    assert (fields["qk_norm"], fields["n_kv_heads"], fields["rope_theta"]) == (fmt == "qwen3", extra.get("num_key_value_heads"), 5e5)
    model = build_model(fields)
    model.load_state_dict(load_hf_softmax(str(tmp_path)))  # strict: every tensor has its place
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-5


def test_unsupported_llama_variants_are_refused_by_name():
    from llm.hf import softmax_fields

    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 64, "rms_norm_eps": 1e-6}
    with pytest.raises(ValueError, match="attention_bias"):
        softmax_fields({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="rope_type"):
        softmax_fields({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="only llama and qwen3"):
        softmax_fields({**base, "model_type": "mistral"})


FLA = {  # model type -> (our fields, fla's config and model class names)
    "delta_net": ({"mixer": "deltanet", "mixer_args": {"deltanet": {"use_gate": True}}}, "DeltaNetForCausalLM"),
    "gated_deltanet": ({"mixer": "gated_deltanet", "mixer_args": {"gated_deltanet": {"expand_v": 2.0}}},
                       "GatedDeltaNetForCausalLM"),
    "mesa_net": ({"mixer": "mesa"}, "MesaNetForCausalLM"),
}


@pytest.mark.parametrize("fmt", list(FLA))
def test_fla_formats_load_every_tensor_into_fla_models(fmt, tmp_path, data_dir):
    """fla's model classes build on CPU (only their forward needs Triton): the export fills every
    parameter of them with our tensors, under fla's names and shapes."""
    pytest.importorskip("fla.models")
    from transformers import AutoModelForCausalLM

    fields, arch = FLA[fmt]
    model = make_run(tmp_path, data_dir, fields, SEQ_LEN)
    llm_main(["export", str(tmp_path), "--out", str(tmp_path / "hf"), "--format", "hf"])
    import fla.models  # noqa: F401  (registers fla's model types with transformers)

    fla_model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(fla_model).__name__ == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    from llm.hf import to_hf_state
    ours = to_hf_state(model.state_dict(), fmt)
    theirs = fla_model.state_dict()
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


def test_format_follows_the_mixers():
    from llm.hf import hf_format

    assert hf_format(["softmax"] * 2, qk_norm=False) == "llama" and hf_format(["softmax"], qk_norm=True) == "qwen3"
    assert hf_format(["deltanet"], False) == "delta_net" and hf_format(["mesa"], False) == "mesa_net"
    assert hf_format(["gated_deltanet", "softmax"], False) == "gated_deltanet"
    assert hf_format(["gated_deltanet", "softmax"], True) == "llm_gpt"  # fla's attention has no QK-norm
    assert hf_format(["deltanet", "mesa"], False) == "llm_gpt"
    assert hf_format(["momentum"], False) == "llm_gpt" and hf_format(["pdssm", "softmax"], False) == "llm_gpt"


def test_hf_softmax_checkpoint_is_checked_against_the_model_config(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm.config import model_config
    from llm.export import load_hf_softmax

    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    fits = {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_hidden": 96}
    state = load_hf_softmax(str(tmp_path), model_config(fits))
    build_model(fits).load_state_dict(state)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.gate_up\.weight: \[192, 32\] in the checkpoint, "
                                         r"\[128, 32\] in the config"):
        load_hf_softmax(str(tmp_path), model_config({**fits, "mlp_hidden": 64}))
    with pytest.raises(ValueError, match=r"model\.rope_theta: 10000\.0 in the checkpoint, 500000\.0 in the config"):
        load_hf_softmax(str(tmp_path), model_config({**fits, "rope_theta": 5e5}))
    with pytest.raises(ValueError, match="model layers: the config's are"):
        load_hf_softmax(str(tmp_path), model_config({**fits, "layer_pattern": ["softmax", "gated_deltanet"]}))


def test_lm_eval_hf_model_scores_the_export_as_our_adapter(tmp_path, data_dir):
    """Stock scoring (lm-eval's `hf` model, default arguments) of a Llama export equals our
    adapter's on the run, empty contexts included: both put EOS (the export's BOS) before them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llm.eval.harness import LLMAdapter

    make_run(tmp_path, data_dir, SHAPES["llama"], SEQ_LEN)
    llm_main(["export", str(tmp_path), "--out", str(tmp_path / "hf"), "--format", "hf"])
    # (lm-eval moves a context's trailing whitespace into the continuation; our adapter does not)
    pairs = [("", "The value of the object"), ("The object", " is a class"), ("x = 1", " and y = 2")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    stock = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=2).loglikelihood(requests)
    ours = LLMAdapter(run_dir=str(tmp_path), device="cpu").loglikelihood(requests)
    for (lp, greedy), (want_lp, want_greedy) in zip(stock, ours):
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


def test_fla_hybrid_names_its_attention_layers(tmp_path, data_dir):
    """A Gated DeltaNet + softmax hybrid: fla's config takes the export's `attn` entry (fla's
    attention layers need flash-attn, so the model itself is built only on a GPU)."""
    pytest.importorskip("fla.models")
    from fla.models import GatedDeltaNetConfig
    from safetensors.torch import load_file

    make_run(tmp_path, data_dir, {"layer_pattern": ["gated_deltanet", "softmax"], "n_layers": 4, "n_kv_heads": 2},
             SEQ_LEN)
    llm_main(["export", str(tmp_path), "--out", str(tmp_path / "hf"), "--format", "hf"])
    config = GatedDeltaNetConfig.from_pretrained(tmp_path / "hf")
    assert config.attn["layers"] == [1, 3] and config.attn["num_kv_heads"] == 2 and config.attn["num_heads"] == 4
    names = load_file(tmp_path / "hf" / "model.safetensors")
    assert names["model.layers.1.attn.k_proj.weight"].shape == (16, 32)  # 2 kv heads of 8
    assert "model.layers.0.attn.A_log" in names and "model.layers.1.attn.A_log" not in names
