"""Test setup: the repository root on sys.path (``configs`` is a top-level package, not installed); the
subprocess jobs of the selected tests start as soon as collection ends (tests/background.py)."""

import os
import sys

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
