"""bench/bench_fusion.py --quick runs end to end and writes its JSON (no timing assertions).

The run is a background job (tests/background.py): it starts when collection ends, beside the other tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import background
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_fusion.py"


def _quick_commands(folder):
    out = folder / "results.json"
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return [background.Command([str(BENCH), "--quick", "--out", str(out), "--markdown", str(out.with_suffix(".md"))], cwd=ROOT, env=env)]


# Started when collection ends, beside the in-process tests (tests/background.py).
QUICK = background.register("bench_quick", _quick_commands, fixture="quick_run", timeout=240)


@pytest.fixture(scope="module")
def quick_run():
    outcome = QUICK.result()
    out = outcome.folder / "results.json"
    return outcome.procs[0], out, out.with_suffix(".md")


@pytest.mark.slow
def test_quick_exits_zero(quick_run):
    proc, _, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_quick_writes_json_with_expected_keys(quick_run):
    _, out, _ = quick_run
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert {"results", "device", "settings", "loadavg_start", "total_s"} <= set(report)
    for key in ("cpu_model", "cpu_cores", "jax_backend", "jax_version", "device_kind"):
        assert key in report["device"]
    assert not list(out.parent.glob("*.tmp")), "temporary file left behind"
    results = report["results"]
    kinds = {r["kind"] for r in results}
    assert {"pair", "reference", "vmap", "k_models"} <= kinds
    for r in results:
        assert "device" in r and r["device"]["jax_backend"], r
        assert r["status"] in ("ok", "unsupported"), r
    pairs = [r for r in results if r["kind"] == "pair"]
    assert {r["model"] for r in pairs} == {"mlpnet", "vgg11", "resnet18", "vit"}
    assert {(r["mode"], r["solver"]) for r in pairs if r["model"] == "vit"} == {
        ("weights", "exact-host"), ("weights", "sinkhorn"), ("activations", "exact-host")}
    assert {r["mode"] for r in pairs} == {"weights", "activations"}
    for r in pairs:
        for key in ("solver", "compile_s", "fuse_ms", "check_ms", "rss_peak_mb", "timing"):
            assert key in r, (key, r)
        if r["mode"] == "activations":
            assert "capture_ms" in r and r["samples"] > 0
    refs = [r for r in results if r["kind"] == "reference"]
    assert any(r["status"] == "unsupported" and r["model"] == "resnet18" for r in refs)
    assert any(r["status"] == "unsupported" and r["model"] == "vit" for r in refs)
    for r in (r for r in refs if r["status"] == "ok"):
        assert r["ref_ms"] > 0 and r["speedup"], r
        assert all(d < 1e-4 for d in r["max_abs_diff_vs_jax"].values()) or r["solver"].endswith("sinkhorn"), r
    for r in (r for r in results if r["kind"] == "vmap"):
        assert r["pairs_per_s"] > 0 and r["pairs"] >= 1
    for r in (r for r in results if r["kind"] == "k_models"):
        assert r["k"] >= 2 and r["fuse_ms"] > 0


@pytest.mark.slow
def test_quick_prints_markdown_table(quick_run):
    proc, _, md = quick_run
    assert "| model | mode | solver |" in proc.stdout
    assert md.read_text().strip() in proc.stdout


@pytest.mark.slow
def test_bench_many_runs_and_writes_every_method_per_k(tmp_path):
    """bench/bench_many.py on tiny shapes: one row per (K, method) with a positive time."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    out = tmp_path / "many.json"
    args = ["--ks", "3", "--samples", "40", "--repeats", "1", "--iterations", "2", "--widths", "12", "8", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_many.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["k"], r["method"]) for r in rows} == {
        (3, "cca"), (3, "ot-acts barycentre (correlation)"), (3, "weight matching barycentre")}
    assert all(r["fusion_ms"] > 0 for r in rows)
