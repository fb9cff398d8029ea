"""`python -m llm <command>` (installed as `mixer-gpt <command>`): train, eval, generate, export,
bench, convert, plot, probe, sweep, reproduce. `--help` lists them; `<command> --help` gives a command's flags.

A config error (an unknown key, a bad value; llm.config.ConfigError) ends any command with its
message alone and exit status 2, as argparse does for a bad flag.
"""
import argparse
import sys

from llm import HelpFormatter


def _train(argv):
    p = argparse.ArgumentParser(prog="python -m llm train", description="Train a model from a YAML config.",
                                formatter_class=HelpFormatter)
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4 train.resume=auto")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config as YAML and exit without training")
    a = p.parse_intermixed_args(argv)  # --print-config may come after the overrides
    from omegaconf import OmegaConf

    from llm.config import load_config

    cfg = load_config(a.config, a.overrides)
    if a.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return
    from llm.train import train
    train(cfg)


def _lazy(module: str):
    """A command implemented by `module.main(argv)`."""
    def run(argv):
        import importlib
        importlib.import_module(module).main(argv)
    return run


COMMANDS = {  # name -> (runner, one line of help)
    "train": (_train, "train a model from a YAML config (also under torchrun / sbatch)"),
    "eval": (_lazy("llm.eval.cli"), "perplexity, lm-eval tasks, induction heads, ICL probes of a run or export"),
    "generate": (_lazy("llm.generate"), "sample a continuation of a prompt from a run or export"),
    "export": (_lazy("llm.export"), "write a checkpoint as a model directory (ours, or Hugging Face's formats)"),
    "bench": (_lazy("llm.bench"), "training throughput of a config on this device"),
    "convert": (_lazy("llm.checkpoint"), "write a checkpoint's universal copy (to resume on another world size)"),
    "plot": (_lazy("llm.eval.plot"), "loss curves, induction heatmaps and telemetry of runs as PNGs"),
    "probe": (_lazy("llm.eval.probes"), "synthetic state-tracking and associative-recall probes"),
    "sweep": (_lazy("llm.sweep"), "a grid of training runs (here or as a Slurm job array) and its loss table"),
    "reproduce": (_lazy("llm.reproduce"), "one command per paper claim: results JSON + plot (docs/reproductions.md)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join([
        "usage: python -m llm <command> [arguments]   (installed: mixer-gpt <command> [arguments])", "",
        "GPT pretraining with swappable token mixers (softmax, momentum, DeltaNet, Gated DeltaNet, Mesa, PD-SSM).",
        "", "commands:", *lines, "",
        "`python -m llm <command> --help` lists a command's arguments; data preparation is `python -m data_prep`."])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\n\nerror: {problem}", file=sys.stderr)
        sys.exit(2)
    from llm.config import ConfigError

    try:
        COMMANDS[argv[0]][0](argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
