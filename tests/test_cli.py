"""`python -m llm`: top-level help, help text and defaults for every flag, `train --print-config`,
config errors as one message with exit status 2, and eval / generate on an export directory."""
import argparse

import pytest
from omegaconf import OmegaConf

from fake_run import make_run
from llm.__main__ import COMMANDS, main
from llm.config import load_config

# bench and convert (llm/bench.py, llm/checkpoint.py) still have positionals without help
DOCUMENTED = ["train", "eval", "generate", "export", "plot", "probe"]


def test_top_level_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m llm <command>")
    assert all(f"\n  {name} " in out for name in COMMANDS)
    for argv, problem in [([], "no command given"), (["trian"], "unknown command 'trian'")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "commands:" in err and err.rstrip().endswith(f"error: {problem}")


class Parsed(Exception):
    pass


def parsers_of(command, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser(s) a command builds (subcommand parsers included), caught at parse time."""
    seen = []

    def catch(self, *args, **kwargs):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", catch)
    with pytest.raises(Parsed):
        main([command])
    stack, found = list(seen), []
    while stack:
        parser = stack.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return found


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_flag_has_help_and_shows_its_default(command, monkeypatch):
    for parser in parsers_of(command, monkeypatch):
        assert parser.formatter_class.__name__ == "HelpFormatter", parser.prog
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog}: {action.dest} has no help"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{parser.prog}: {action.dest}"


def test_train_print_config_is_the_resolved_config(capsys):
    main(["train", "configs/quickstart.yaml", "model.d_model=64", "--print-config", "optim.lr=3e-4"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed == load_config("configs/quickstart.yaml", ["model.d_model=64", "optim.lr=3e-4"])
    assert printed.model.d_model == 64 and printed.optim.lr == 3e-4


def test_config_error_is_one_message_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "configs/quickstart.yaml", "model.nope=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.nope: unknown key; allowed here: vocab_size,") and "Traceback" not in err
    assert err.count("\n") == 1


def test_generate_and_eval_read_an_export(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    make_run(run, data_dir, {"layer_pattern": ["softmax", "momentum"]}, 32)
    main(["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"])
    capsys.readouterr()
    texts = []
    for source in (run, tmp_path / "hf"):
        main(["generate", str(source), "--prompt", "The value of", "--max-new-tokens", "8", "--temperature", "0"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("The value of")
    main(["eval", str(tmp_path / "hf"), "--ppl", "--windows", "2"])
    out = capsys.readouterr().out
    assert "step_00000001" in out and (tmp_path / "hf" / "eval" / "ppl.json").is_file()
