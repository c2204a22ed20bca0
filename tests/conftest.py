"""Test setup: the repository root on sys.path (``configs`` is a top-level package, not installed); XLA's
backend optimisation level 0 for the whole run; the subprocess jobs of the selected tests start as soon as
collection ends (tests/background.py).

The tests' arrays are small, so most of the suite's time is XLA:CPU compiling (LLVM's optimisation passes);
level 0 cuts that by about a third (tests/test_fusion.py: 109 s -> 75 s on 2 cores) and leaves every
assertion as it is. It is set here, before JAX starts a backend, and inherited by the subprocess jobs
(``python fuse.py`` / ``train.py``, the bench's smoke run, the eight-device run). A level given in
``XLA_FLAGS`` wins: ``XLA_FLAGS=--xla_backend_optimization_level=3 pytest`` tests the optimised code.
"""

import os
import sys

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import background  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import mode)


def pytest_collection_finish(session):
    # Under pytest-xdist every worker collects every test: each job runs where a test first needs it.
    if not os.environ.get("PYTEST_XDIST_WORKER") and not session.config.option.collectonly:
        background.queue_used(session.items)


def pytest_sessionfinish(session, exitstatus):
    background.cleanup()
