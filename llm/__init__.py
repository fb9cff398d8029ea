"""GPT pretraining with swappable token mixers."""
import argparse

__version__ = "0.1.0"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The `--help` of every command: each flag with its default, except None and off switches
    (their help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
