"""The contract every registered mixer keeps (llm/model/mixers/base.py), checked on each mixer of
`MIXERS` and on the option variants and hybrid stacks that change its code paths: the step form fed
in pieces of several sizes equals the parallel form, causality, a role for every parameter, the
parameters' dtype in and out, the declared interface, plain values in what a model is built from,
and document starts (`doc_start`): nothing crosses one, in either form, and gradients stay finite."""
import dataclasses

import pytest
import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from llm.model import build_model
from llm.model.mixers import MIXERS
from llm.model.roles import param_role
from stepping import run_in_pieces

V, T = 61, 23
PDSSM = {"state_size": 6, "dict_size": 3, "chunk_size": 4}
TINY = {"vocab_size": V, "d_model": 32, "n_layers": 3, "n_heads": 4,
        "mixer_args": {"deltanet": {"chunk_size": 8}, "gated_deltanet": {"chunk_size": 8},  # several chunks
                       "mesa": {"chunk_size": 8}, "pdssm": PDSSM}}
VARIANTS = {
    "softmax_qk_norm": {"qk_norm": True},
    "softmax_gqa": {"n_kv_heads": 2},
    "softmax_untied": {"tie_embeddings": False},
    "momentum_gqa": {"mixer": "momentum", "n_kv_heads": 2},
    "momentum_pre_rope_learned": {"mixer": "momentum", "mixer_args": {
        "momentum": {"apply": "pre_rope", "first": "zero", "learn_gamma": True}}},
    "pdssm_discrete": {"mixer": "pdssm", "mixer_args": {"pdssm": {**PDSSM, "selection": "discrete"}}},
    "pdssm_identity": {"mixer": "pdssm", "mixer_args": {"pdssm": {**PDSSM, "selection": "identity"}}},
    "pdssm_state_norm_real": {"mixer": "pdssm", "mixer_args": {"pdssm": {**PDSSM, "state_norm": True, "phase": False}}},
    "hybrid_gdn_softmax": {"layer_pattern": ["gated_deltanet", "softmax"]},
    "hybrid_pdssm_pdssm_softmax": {"layer_pattern": ["pdssm", "pdssm", "softmax"]},
    "hybrid_momentum_softmax_pdssm": {"layer_pattern": ["momentum", "softmax", "pdssm"]},
}
CASES = {name: {"mixer": name} for name in sorted(MIXERS)} | VARIANTS
CHUNKED = {"deltanet", "gated_deltanet", "mesa"}  # chunked solves: earlier rows may move by rounding
NO_KERNEL = {"pdssm"}  # no fast GPU path exists, so kernels=fla has nothing to require


def make(name, **extra):
    torch.manual_seed(0)
    case = CASES[name]
    args = {**TINY["mixer_args"], **case.get("mixer_args", {})}
    return build_model({**TINY, **case, **extra, "mixer_args": args}).eval()


def mixers_of(model):
    return {block.mixer.name for block in model.blocks}


@pytest.mark.parametrize("name", CASES)
def test_step_form_in_pieces_matches_the_parallel_form(name):
    model = make(name)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, T, V)
        for sizes in ([1, 5, 3, 14], [7, 1, 2, 13], [T]):
            torch.testing.assert_close(run_in_pieces(model, ids, sizes)[0], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_causal(name):
    model = make(name)
    ids = torch.randint(0, V, (2, T))
    changed = ids.clone()
    changed[:, 13] = (changed[:, 13] + 1) % V
    with torch.no_grad():
        full, other = model(ids), model(changed)
    atol = 1e-6 if mixers_of(model) & CHUNKED else 0.0
    torch.testing.assert_close(other[:, :13], full[:, :13], atol=atol, rtol=0)
    assert (other[:, 13:] - full[:, 13:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", CASES)
def test_every_parameter_has_a_role(name):
    model = make(name)
    assert all(param_role(p) is not None for p in model.parameters())


@pytest.mark.parametrize("name", CASES)
def test_outputs_keep_the_parameters_dtype(name):
    model = make(name).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16
        logits, cache = model.forward_step(ids[:, :4], model.init_cache(2))
        assert logits.dtype == torch.bfloat16
        assert model.forward_step(ids[:, 4:5], cache)[0].dtype == torch.bfloat16
        for block in model.blocks:
            x = torch.randn(2, 9, TINY["d_model"], dtype=torch.bfloat16)
            y = block.mixer(x)
            assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", CASES)
def test_declared_interface(name):
    model = make(name)
    for block in model.blocks:
        mixer = block.mixer
        assert isinstance(mixer.o_proj, nn.Linear) and mixer.o_proj.out_features == TINY["d_model"]
        assert isinstance(mixer.n_heads, int) and mixer.n_heads > 0
        assert set(mixer.projections()) <= {"q", "k", "v", "o"}
        assert all(isinstance(p, nn.Linear) for p in mixer.projections().values())
        if mixer.has_attention_heads:
            q, k = mixer.attention_qk(torch.randn(1, 5, TINY["d_model"]))
            assert q.shape[:3] == (1, 5, mixer.n_heads) and k.shape[:2] == (1, 5)
            mixer.set_head_mask(torch.ones(mixer.n_heads))
            mixer.set_head_mask(None)
            with pytest.raises(ValueError, match="head mask"):
                mixer.set_head_mask(torch.ones(mixer.n_heads + 1))
        else:
            with pytest.raises(TypeError, match="no attention heads"):
                mixer.set_head_mask(torch.ones(mixer.n_heads))


@pytest.mark.parametrize("name", CASES)
def test_the_model_is_built_from_plain_frozen_values(name):
    spec = make(name).spec
    hash(spec)  # frozen all the way down: the layers' options too
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.layers[0][1].__setattr__("x", 1)

    def values(v):
        if dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                yield from values(getattr(v, f.name))
        elif isinstance(v, (tuple, list)):
            for item in v:
                yield from values(item)
        else:
            yield v

    assert not [v for v in values(spec) if isinstance(v, (DictConfig, ListConfig))]


@pytest.mark.parametrize("name", CASES)
def test_kernels_fla_requires_the_fast_path(name):
    """kernels=fla never falls back silently: on CPU every mixer that has a GPU kernel says so."""
    model = make(name, kernels="fla")
    ids = torch.randint(0, V, (1, 8))
    if mixers_of(model) <= NO_KERNEL:
        assert model(ids).shape == (1, 8, V)
    else:
        with pytest.raises(RuntimeError, match="kernels=fla"):
            model(ids)


def doc_starts_of(rows):
    """bool [len(rows), T] with the given start positions per row."""
    starts = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, positions in enumerate(rows):
        starts[b, positions] = True
    return starts


# Piece starts of the sizes below: 1, 6, 9 and 7, 8, 10. Row 0 has starts inside pieces and at
# piece starts, row 1 a start at 0, starts in a row and one at the last position.
STARTS = doc_starts_of([[6, 11, 13, 20], [0, 7, 8, 9, 15, 22]])


@pytest.mark.parametrize("name", CASES)
def test_a_document_start_hides_everything_before_it(name):
    model = make(name)
    ids = torch.randint(0, V, (2, T))
    changed = ids.clone()
    changed[:, [3, 12]] = (changed[:, [3, 12]] + 1) % V  # row 0: docs [0, 6), [6, 11), [11, 13); row 1: [9, 15)
    with torch.no_grad():
        full, other = model(ids, doc_start=STARTS), model(changed, doc_start=STARTS)
        unmasked = model(changed)
    atol = 1e-6 if mixers_of(model) & CHUNKED else 0.0
    for b, later in ((0, 13), (1, 15)):  # the first start after the last changed token of the row
        torch.testing.assert_close(other[b, later:], full[b, later:], atol=atol, rtol=0)
        assert (other[b, 12:later] - full[b, 12:later]).abs().max() > 1e-4  # in the changed document
        assert (unmasked[b, later:] - full[b, later:]).abs().max() > 1e-4  # without the mask: seen


@pytest.mark.parametrize("name", CASES)
def test_a_packed_document_reads_as_the_document_alone(name):
    """After a start, the logits are those of the document fed from position 0 (attention differs
    only by RoPE's absolute positions, i.e. by rounding)."""
    model = make(name)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        packed = model(ids, doc_start=STARTS)
        for b, start in ((0, 13), (1, 9)):  # row 0: [13, 20), row 1: [9, 15)
            end = STARTS[b, start + 1:].nonzero()[0, 0].item() + start + 1
            alone = model(ids[b:b + 1, start:end])
            torch.testing.assert_close(packed[b:b + 1, start:end], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_step_form_in_pieces_matches_the_parallel_form_across_document_starts(name):
    model = make(name)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        full = model(ids, doc_start=STARTS)
        for sizes in ([1, 5, 3, 14], [7, 1, 2, 13], [T]):
            torch.testing.assert_close(run_in_pieces(model, ids, sizes, STARTS)[0], full, atol=1e-5, rtol=1e-5)
        # a start only at position 0, or none, is one document: the unmasked forward
        torch.testing.assert_close(model(ids, doc_start=doc_starts_of([[0], []])), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_gradients_through_document_starts_are_finite(name):
    model = make(name).train()
    ids = torch.randint(0, V, (2, T))
    model(ids, doc_start=STARTS).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_doc_start_must_be_bool_b_t():
    model = make("softmax")
    ids = torch.randint(0, V, (2, T))
    with pytest.raises(ValueError, match="doc_start"):
        model(ids, doc_start=STARTS[:, :-1])
    with pytest.raises(ValueError, match="doc_start"):
        model(ids, doc_start=STARTS.long())
