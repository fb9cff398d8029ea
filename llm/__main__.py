"""`python -m llm <command>`: train, generate, eval, bench, export, convert, plot, probe."""
import argparse
import sys


def _train(argv):
    p = argparse.ArgumentParser(prog="python -m llm train", description="Train a model from a YAML config.")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4 train.resume=auto")
    a = p.parse_args(argv)
    from llm.config import load_config
    from llm.train import train
    train(load_config(a.config, a.overrides))


def _lazy(module: str):
    """A command implemented by `module.main(argv)`."""
    def run(argv):
        import importlib
        importlib.import_module(module).main(argv)
    return run


COMMANDS = {
    "train": _train,
    "generate": _lazy("llm.generate"),
    "bench": _lazy("llm.bench"),
    "eval": _lazy("llm.eval.cli"),
    "export": _lazy("llm.export"),
    "convert": _lazy("llm.checkpoint"),
    "plot": _lazy("llm.eval.plot"),
    "probe": _lazy("llm.eval.probes"),
    "reproduce": _lazy("llm.reproduce"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m llm {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
