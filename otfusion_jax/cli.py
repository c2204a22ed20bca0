"""Command-line plumbing shared by train.py and fuse.py: the config flag and one-line errors.

Every way a command line can be wrong ends in one line ``<prog>: error: <message>`` on stderr and exit
status 2, before any work: an unknown flag or config field, a value the flag parser refuses
(``--config.experiment.num_samples=abc``), or a value ``configs_util.validate`` refuses.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
from typing import Any, NoReturn

__all__ = ["clean_error", "usage_error", "define_config_flag", "flag_error_message", "DEFAULT_CONFIG", "run"]

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_mlpnet.py")

_BAD_FLAG_VALUE = re.compile(r"^flag --(?P<name>[\w.]+)=(?P<value>.*?): (?P<why>.*)$", re.S)


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


def _override_paths(argv: list[str]) -> list[str]:
    """The config paths overridden on a command line: ``--config.train.lr=1`` -> ``train.lr``."""
    paths = []
    for arg in argv:
        found = re.match(r"^--?(?:no)?config\.([\w.]+)", arg)
        if found:
            paths.append(found.group(1))
    return paths


def _unknown_field_message(error: object, argv: list[str]) -> str:
    """``unknown field config.train.epochz`` for the AttributeError/KeyError a locked ConfigDict raises."""
    text = clean_error(error)
    found = re.match(r"""^['"]?([\w.]+)['"]?\s*(.*)$""", text)
    key, hint = (found.group(1), found.group(2)) if found else (text, "")
    named = [p for p in _override_paths(argv) if key in p.split(".")]
    field = f"config.{named[-1]}" if named else key
    hint = f"; {hint[0].lower()}{hint[1:]}" if hint else ""
    return f"bad --config override: unknown field {field}{hint} (configs/default.py lists every field)"


def flag_error_message(error: Exception) -> str:
    """The one-line message of a flag the parser refused, naming a config field as ``config.<path>``.

    Args:
      error: The ``absl.flags.Error`` raised while parsing.

    Returns:
      E.g. ``config.experiment.num_samples='abc': must be an integer >= 1 (invalid literal for int() ...)``.
    """
    text = clean_error(error)
    found = _BAD_FLAG_VALUE.match(text)
    if not found or not found.group("name").startswith("config."):
        return text
    path = found.group("name")[len("config.") :]
    from otfusion_jax import configs_util  # pylint: disable=import-outside-toplevel

    rule = configs_util.FIELDS.get(path)
    allowed = f"must be {rule.allowed()}" if rule is not None else "not a valid value"
    why = found.group("why")
    with contextlib.suppress(ValueError, SyntaxError):
        parsed = ast.literal_eval(why)  # absl's boolean parser gives a tuple: ('Non-boolean argument ...', 'yes')
        if isinstance(parsed, tuple) and parsed:
            why = str(parsed[0])
    return f"config.{path}={found.group('value')!r}: {allowed} ({why})"


def _parse_error(prog: str, error: Exception, argv: list[str]) -> NoReturn:
    from absl import flags  # pylint: disable=import-outside-toplevel

    if isinstance(error, (AttributeError, KeyError)):
        usage_error(prog, _unknown_field_message(error, argv))
    if isinstance(error, flags.Error):
        usage_error(prog, flag_error_message(error))
    usage_error(prog, f"bad --config: {clean_error(error)}")


def define_config_flag(prog: str, config_flags: Any, flags: Any, default: str = DEFAULT_CONFIG) -> Any:
    """Defines ``--config`` (a configs/<name>.py file, overridable with --config.<path>=<value>).

    The default config file is read (and the overrides of the command line applied) right here, so a
    bad override of the default config ends the program here, in one line.
    """
    try:
        return config_flags.DEFINE_config_file(
            "config",
            default,
            "Experiment config file (configs/<name>.py); override fields with --config.<path>=<value>.",
            lock_config=True,
        )
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        _parse_error(prog, e, sys.argv)


def run(prog: str, main: Any) -> None:
    """``absl.app.run(main)``, turning every flag parsing error into one line and exit status 2."""
    from absl import app  # pylint: disable=import-outside-toplevel
    from absl import flags  # pylint: disable=import-outside-toplevel

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
            _parse_error(prog, e, argv)

    app.run(main, flags_parser=parse)
