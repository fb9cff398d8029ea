"""PD-SSM emulates a finite automaton exactly, at any length, with hand-set parameters: P_t the
automaton's transition for token t, u = 0, |d| = const, phase 0. What reaches the readout is the
one-hot state scaled by prod |d_t|, unless `state_norm` divides that scale out."""
import math

import pytest
import torch

from llm.model import build_model


def cycle_automaton_mixer(state_norm: bool, magnitude: float):
    """One head, N = 8 states (5 used), on inputs x = e_token (d_model 4): token 0 stays, 1 moves +1, 2 moves -1."""
    mixer = build_model({"vocab_size": 3, "d_model": 4, "n_layers": 1, "n_heads": 1, "mixer": "pdssm",
                         "mixer_args": {"pdssm": {"state_size": 8, "dict_size": 3, "state_norm": state_norm}}}
                        ).blocks[0].mixer
    N, big = 8, 50.0
    with torch.no_grad():
        for p in mixer.parameters():
            p.zero_()
        mixer.magnitude[-1].bias.fill_(math.log(magnitude / (1 - magnitude)))
        mixer.phase[-1].bias.fill_(-big)  # phase 2 pi sigmoid(-50) = 0
        mixer.select.weight.copy_(big * torch.eye(3, 4))  # token m picks dictionary entry m
        for m, step in enumerate((0, 1, -1)):
            rows = [(j + step) % 5 if j < 5 else j for j in range(N)]  # column j -> row rows[j]
            mixer.dictionary[0, m] = big * torch.nn.functional.one_hot(torch.tensor(rows), N).float()
    return mixer


@pytest.mark.parametrize("state_norm", [False, True])
def test_hand_set_pdssm_follows_cycle_navigation_at_every_length(state_norm):
    T, magnitude = 400, 0.95  # 0.95^400 ~ 1e-9: above the normalization's floor (norm 1e-12)
    mixer = cycle_automaton_mixer(state_norm, magnitude)
    tokens = torch.randint(0, 3, (4, T), generator=torch.Generator().manual_seed(0))
    truth = torch.tensor([0, 1, -1])[tokens].cumsum(1) % 5
    x = torch.nn.functional.one_hot(tokens, 4).float()
    seen = []
    mixer.readout.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        mixer(x)
    state = seen[0][..., :8]  # [B, T, 2N] of the one head: the real part
    assert torch.equal(state.argmax(-1), truth)  # exact at every length
    expected = torch.full((T,), 16 ** 0.5) if state_norm else magnitude ** torch.arange(1, T + 1).float()
    torch.testing.assert_close(seen[0].abs().amax(-1), expected.expand(4, T), rtol=1e-3, atol=0)
