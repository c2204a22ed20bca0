"""Command-line plumbing shared by train.py and fuse.py: the config flag, one-line errors, the compilation cache.

Every way a command line can be wrong ends in one line ``<prog>: error: <message>`` on stderr and exit
status 2, before any work: an unknown flag or config field, a value the flag parser refuses
(``--config.experiment.num_samples=abc``), or a value ``configs_util.validate`` refuses.

Both scripts keep JAX's compiled programs in a persistent compilation cache (:func:`enable_compilation_cache`:
``$OTFUSION_JAX_CACHE``, default ``~/.cache/otfusion-jax/jax``), so a second run on the same shapes loads
them instead of compiling; :class:`CompileLog` counts what was compiled, loaded and written.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
import threading
from typing import Any, NoReturn

__all__ = [
    "clean_error",
    "usage_error",
    "define_config_flag",
    "flag_error_message",
    "DEFAULT_CONFIG",
    "run",
    "CACHE_ENV",
    "compilation_cache_dir",
    "enable_compilation_cache",
    "CompileLog",
]

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


CACHE_ENV = "OTFUSION_JAX_CACHE"
_CACHE_OFF = ("", "0", "off", "none", "false", "no")


def compilation_cache_dir(environ: Any = None) -> str | None:
    """Where the CLIs keep compiled programs: ``$OTFUSION_JAX_CACHE``, else ``$XDG_CACHE_HOME/otfusion-jax/jax``.

    ``$XDG_CACHE_HOME`` defaults to ``~/.cache``. ``OTFUSION_JAX_CACHE`` set to ``off`` (or ``0``, ``none``,
    ``false``, ``no``, empty) turns the cache off: None.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _CACHE_OFF else os.path.abspath(os.path.expanduser(value))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "otfusion-jax", "jax")


def enable_compilation_cache(path: str | None | object = ...) -> str | None:
    """Turns on JAX's persistent compilation cache for this process, caching every program however small.

    JAX's defaults only cache programs that took >= 1 s to compile; fusion's are many small ones, so both
    thresholds are set to cache everything (``jax_persistent_cache_min_compile_time_secs=0``,
    ``jax_persistent_cache_min_entry_size_bytes=-1``). Programs with host callbacks (``exact_backend="host"``,
    what "auto" picks on a CPU) carry the callback in their cache key: JAX writes them but a new process
    cannot load them (it compiles them again), see README ("Compile time").

    Args:
      path: The cache folder; default :func:`compilation_cache_dir`. None: leave the cache off.

    Returns:
      The folder in use, or None when off or when the folder cannot be created (then nothing is cached).
    """
    if path is ...:
        path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax  # pylint: disable=import-outside-toplevel

    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return os.fspath(path)


class CompileLog:
    """Counts this process's XLA compilations from ``jax.monitoring`` events (listeners registered once).

    ``CompileLog.snapshot()`` before and after a run, ``CompileLog.since(before)`` for the difference:
    ``programs`` (compiled or loaded), ``compile_seconds`` (their total, loading included), ``loaded``
    (persistent-cache hits), ``written`` (new cache entries), ``trace_seconds`` and ``lower_seconds`` (tracing to
    jaxprs and lowering to MLIR: done again by every process, cache or not).
    """

    _lock = threading.Lock()
    _counts = {"programs": 0, "compile_seconds": 0.0, "loaded": 0, "written": 0, "trace_seconds": 0.0, "lower_seconds": 0.0}
    _registered = False

    _DURATIONS = {
        "/jax/core/compile/backend_compile_duration": ("programs", "compile_seconds"),
        "/jax/core/compile/jaxpr_trace_duration": (None, "trace_seconds"),
        "/jax/core/compile/jaxpr_to_mlir_module_duration": (None, "lower_seconds"),
    }
    _EVENTS = {"/jax/compilation_cache/cache_hits": "loaded", "/jax/compilation_cache/cache_misses": "written"}

    @classmethod
    def _on_event(cls, event: str, **_kwargs: Any) -> None:
        key = cls._EVENTS.get(event)
        if key is not None:
            with cls._lock:
                cls._counts[key] += 1

    @classmethod
    def _on_duration(cls, event: str, duration_secs: float, **_kwargs: Any) -> None:
        keys = cls._DURATIONS.get(event)
        if keys is not None:
            count, secs = keys
            with cls._lock:
                if count is not None:
                    cls._counts[count] += 1
                cls._counts[secs] += float(duration_secs)

    @classmethod
    def register(cls) -> None:
        """Registers the listeners (once per process)."""
        with cls._lock:
            if cls._registered:
                return
            cls._registered = True
        from jax import monitoring  # pylint: disable=import-outside-toplevel

        monitoring.register_event_listener(cls._on_event)
        monitoring.register_event_duration_secs_listener(cls._on_duration)

    @classmethod
    def snapshot(cls) -> dict[str, float]:
        """The counts so far (registers the listeners first)."""
        cls.register()
        with cls._lock:
            return dict(cls._counts)

    @classmethod
    def since(cls, before: dict[str, float]) -> dict[str, float]:
        """The counts since ``before`` (a :meth:`snapshot`), seconds rounded to milliseconds."""
        now = cls.snapshot()
        return {k: round(now[k] - before[k], 3) if isinstance(now[k], float) else now[k] - before[k] for k in now}
