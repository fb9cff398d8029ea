import json

import matplotlib.image as mpimg

from llm.eval.plot import main


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_run(root, name, with_eval):
    run = root / name
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 0, "val_loss": 8.3, "val_ppl": 4000.0}] + [
        {"step": s, "loss": 8.0 - s / 50, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.1,
         "tokens": s * 2048, **({"val_loss": 8.1 - s / 50} if s % 100 == 0 else {})}
        for s in range(10, 310, 10)])
    if with_eval:
        layers = [{"layer": 0, "mixer": "softmax", "induction": [0.1, 0.8, 0.0, 0.2], "anti_induction": [0.0] * 4},
                  {"layer": 1, "mixer": "gated_deltanet", "copy_score_change": -0.3}]
        ckpts = [{"tag": f"step_{s:08d}", "step": s, "induction": [[0.1 * s / 100] * 4, None],
                  "anti_induction": [[0.05] * 4, None]} for s in (100, 200, 300)]
        (run / "eval").mkdir()
        (run / "eval" / "induction.json").write_text(json.dumps({"layers": layers, "checkpoints": ckpts}))
        write_jsonl(run / "telemetry.jsonl", [
            {"step": s, "layer": layer, "head": h, "mixer": "softmax", "product": p,
             "effective_rank": 8.0 - s / 100 + h, "nuclear_norm": 1.0}
            for s in (100, 200, 300) for layer in (0, 1) for h in range(4) for p in ("qk", "vo")])
    return run


def test_plots_from_fake_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path, "run_a", True), fake_run(tmp_path, "run_b", False)
    out = tmp_path / "plots"
    main([str(a), str(b), "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss_curves.png", "run_a_induction.png", "run_a_induction_evolution.png", "run_a_rank.png"]
    for name in names:
        img = mpimg.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # something was drawn
    assert capsys.readouterr().out.count("wrote") == 4
