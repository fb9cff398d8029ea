"""`python -m llm probe state-tracking`: the probe's models, trained and scored end to end."""
import json

from llm.eval import probes


def test_state_tracking_probe_uses_the_length_generalizing_pdssm(tmp_path):
    mixer, args = probes.state_tracking_models(4, 4)["pdssm"]
    model = probes.make_model(probes.TASKS["parity"], mixer, args, 16, 1, 2, seed=0)
    got = model.blocks[0].mixer.args
    assert (got.state_norm, got.phase, got.magnitude_init) == (True, False, 0.99)
    rows = probes.main(["state-tracking", "--tasks", "parity,cycle_nav", "--models", "pdssm,softmax", "--steps", "3",
                        "--batch", "4", "--d-model", "16", "--layers", "1", "--heads", "2", "--state-size", "4",
                        "--test-lengths", "8,12", "--eval-batch", "8", "--json", str(tmp_path / "rows.json")])
    assert [(r["task"], r["model"]) for r in rows] == [
        ("parity", "pdssm"), ("parity", "softmax"), ("cycle_nav", "pdssm"), ("cycle_nav", "softmax")]
    assert all(0 <= r[L] <= 1 for r in rows for L in (8, 12))
    with open(tmp_path / "rows.json") as f:
        assert len(json.load(f)["rows"]) == 4
