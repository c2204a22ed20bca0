"""In-process runs of train.py and fuse.py: one command line, its exit status, stdout and stderr.

``run_script("fuse.py", "--config.experiment.num_samples=0")`` executes the script as ``python fuse.py ...``
would (``runpy`` as ``__main__``, so ``absl.app.run`` parses the command line and calls ``main``), but
inside the test process: JAX is imported and compiled once for the whole suite instead of once per
subprocess.

absl flags are global, and both scripts define ``--config`` and ``--progress`` (and config_flags
defines one flag per ``--config.<path>`` override while parsing). Each run therefore starts from the
flags that existed before any script ran: the flags a previous run defined are deleted, every flag is
reset to its default (``unparse_flags``), the script is executed afresh (defining its flags for this
command line), and afterwards its flags are deleted again. sys.argv, sys.path, the working directory
and absl's log verbosity are restored, so runs are independent of each other and of the test order.

The scripts' persistent compilation cache (``$OTFUSION_JAX_CACHE``) is off during a run unless the test asks
for one (``cache=<folder>``): the test process keeps its in-memory caches, and nothing is written to ~/.cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import runpy
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from absl import command_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ROOT", "Result", "run_script", "subprocess_env"]

CACHE_ENV = "OTFUSION_JAX_CACHE"


def subprocess_env(cache: str | os.PathLike = "off", **more: str) -> dict[str, str]:
    """The environment of a real ``python fuse.py`` / ``train.py`` in a test: CPU, its compilation cache off
    (or ``cache``), and ``more``."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", CACHE_ENV: os.fspath(cache), **more}

_BASE_FLAGS: set[str] | None = None  # the flags defined before any script ran


@dataclasses.dataclass(frozen=True)
class Result:
    """What one command line did (the fields of ``subprocess.CompletedProcess`` that tests read)."""

    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        """The stderr lines that contain ``error:``."""
        return [line for line in self.stderr.splitlines() if "error:" in line]


def _base_flags() -> set[str]:
    global _BASE_FLAGS
    if _BASE_FLAGS is None:
        app.define_help_flags()  # --help & co. are defined once by the first app.run; define them now
        _BASE_FLAGS = set(flags.FLAGS)
    return _BASE_FLAGS


def _reset_flags() -> None:
    fv = flags.FLAGS
    for name in set(fv) - _base_flags():
        delattr(fv, name)
    fv.unparse_flags()


def _exit_code(code: object, stderr: io.StringIO) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=stderr)  # sys.exit("message"): Python prints it and exits with 1
    return 1


def run_script(
    script: str, *args: str, cwd: str | os.PathLike | None = None, cache: str | os.PathLike = "off"
) -> Result:
    """Runs ``python <script> <args>`` in this process.

    Args:
      script: "fuse.py" or "train.py" (a path relative to the repository root).
      *args: The command line after the script name.
      cwd: Working directory of the run (default: the repository root).
      cache: ``$OTFUSION_JAX_CACHE`` during the run ("off": no persistent compilation cache).

    Returns:
      The exit status (0 when main returns, the ``sys.exit`` code otherwise, 1 with a traceback on
      stderr for an uncaught exception, as Python would), and everything printed to stdout and stderr.
    """
    path = os.path.join(ROOT, script)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    saved_verbosity = absl_logging.get_verbosity()
    saved_rename = command_name.make_process_name_useful
    saved_cache = os.environ.get(CACHE_ENV)
    code = 0
    _reset_flags()
    try:
        command_name.make_process_name_useful = lambda: None  # absl would rename the test process
        os.environ[CACHE_ENV] = os.fspath(cache)
        sys.argv = [path, *args]
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                code = _exit_code(e.code, err)
            except Exception:  # noqa: BLE001 - an uncaught exception is what the test must see
                traceback.print_exc()
                code = 1
    finally:
        _reset_flags()
        if saved_cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = saved_cache
        command_name.make_process_name_useful = saved_rename
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        absl_logging.set_verbosity(saved_verbosity)
    return Result(code, out.getvalue(), err.getvalue())
