"""Command-line plumbing shared by train.py and fuse.py: the config flag and one-line errors."""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from typing import Any, NoReturn

__all__ = ["clean_error", "usage_error", "define_config_flag", "DEFAULT_CONFIG", "run"]

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_mlpnet.py")


def clean_error(error: object) -> str:
    """One line of text from an exception, unwrapping a quoted KeyError message."""
    text = str(error)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        with contextlib.suppress(ValueError, SyntaxError):
            text = str(ast.literal_eval(text))
            if len(text) >= 2 and text[0] == text[-1] == "'":
                text = text[1:-1]
    return " ".join(text.replace("\n", " ").split())


def usage_error(prog: str, message: object) -> NoReturn:
    """Prints ``prog: error: message`` on one line and exits with status 2."""
    print(f"{prog}: error: {clean_error(message)}", file=sys.stderr)
    sys.exit(2)


def define_config_flag(prog: str, config_flags: Any, flags: Any, default: str = DEFAULT_CONFIG) -> Any:
    """Defines ``--config`` (a configs/<name>.py file, overridable with --config.<path>=<value>)."""
    try:
        return config_flags.DEFINE_config_file(
            "config",
            default,
            "Experiment config file (configs/<name>.py); override fields with --config.<path>=<value>.",
            lock_config=True,
        )
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        usage_error(prog, f"bad --config override: unknown field {clean_error(e)}")


def run(prog: str, main: Any) -> None:
    """``absl.app.run(main)``, turning a bad --config override (raised while parsing) into one line."""
    from absl import app  # pylint: disable=import-outside-toplevel

    started = []

    def wrapped(argv):
        started.append(True)
        return main(argv)

    try:
        app.run(wrapped)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        if started:
            raise
        usage_error(prog, f"bad --config override: unknown field {clean_error(e)}")
