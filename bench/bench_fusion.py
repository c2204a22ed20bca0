"""Benchmark of the OTFusion pass: JAX (jit, vmap, K parents) against the NumPy + POT reference.

Usage (from the repository root)::

    python bench/bench_fusion.py                     # full run, writes bench/results.json
    python bench/bench_fusion.py --quick             # tiny models, a smoke test (< 1 min)
    python bench/bench_fusion.py --models mlpnet --solvers exact-host sinkhorn --repeats 20

What is timed (every figure is the median of ``--repeats`` warm calls, each
ended by ``jax.block_until_ready``; the compile time is reported apart):

* one pair, per model (MLPNet 784-400-200-100-10 no bias, VGG11 on 32x32x3,
  ResNet18 on 32x32x3 with BatchNorm), mode (weights, activations of
  ``--samples`` inputs; capturing them is timed apart) and solver
  (``exact-auto``: the default ``FusionConfig``, whose "auto" backend is
  ``exact-native`` on a CPU (the C++ solver called as an XLA FFI target,
  ``otfusion_jax.native``; ``exact-lapjv`` or ``exact-host`` where it cannot be
  built) and the auction elsewhere; ``exact-device``: optax Hungarian on the device,
  ``exact-auction``: the parallel auction on the device, ``exact-host``:
  scipy/POT through a host callback, ``exact-lapjv``: the lapjv package's
  Jonker-Volgenant through a host callback (timed where installed), ``sinkhorn``:
  OTT-JAX). The jitted call is
  ``jax.jit(lambda parents, acts: otf.fuse(parents, spec, config, ...))``:
  inside jit there are no host-side input checks; the checks that
  ``otf.fuse`` runs on concrete inputs (structure, NaN/Inf on the host) are
  timed apart as ``check_ms``;
* the same pair fused by the NumPy + POT reference (``tests/reference_otfusion.py``,
  torch layouts, float32 like the original, matmul-based costs like the original's
  ``--ground-metric-eff``) for MLPNet and VGG11 (ResNet18's residual streams
  are not supported by the reference), and the ratio reference / JAX;
* the ratio against the ORIGINAL OTFusion code (PyTorch + POT) from its
  figures measured in issue 15 on the same CPU (``ORIGINAL_ANCHOR``; the
  original is not run here), for the cases whose shapes match;
* vmap throughput (pairs/s) over stacks of MLPNet pairs, and K-parent fusion.

Memory: the process RSS sampled every few ms during each measurement (peak
and increase over the RSS before it), and the process's lifetime peak
(``resource.getrusage``); on a GPU also the device's ``peak_bytes_in_use``.
With ``--rss-subprocess`` (default outside ``--quick``) each pair is also fused
in a fresh process that loads the parents from a file, as the CLI does, and
does nothing else: its peak RSS (``VmHWM``) is the figure comparable to the
original's, with the cold compile time of that process.

The parents are independently initialised networks and the inputs random
normal images (no data set is needed); timings of the exact solvers depend on
the cost structure, so trained parents can differ somewhat.

On a GPU machine run the same command (a CUDA jaxlib installed); the device,
CPU model, core count and JAX backend/version are recorded with every result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --quick is a smoke test whose figures mean nothing: compile with XLA's
# backend optimisation level 0, which halves its compile-bound run time. The
# flag must be in the environment before JAX starts its backend.
QUICK_XLA_FLAG = "--xla_backend_optimization_level=0"
if __name__ == "__main__" and "--quick" in sys.argv[1:]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAG).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# The host solver imports scipy.optimize when it is first traced (0.3 s here):
# imported up front so that no compile_s, cold_compile_s included, counts it.
import scipy.optimize  # noqa: E402, F401  # pylint: disable=unused-import

try:  # the same for the optional lapjv solver
    import lapjv  # noqa: E402, F401  # pylint: disable=unused-import
except ImportError:  # pragma: no cover
    pass

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import otfusion_jax as otf  # noqa: E402
from otfusion_jax import native, ot  # noqa: E402
from otfusion_jax.interop import layouts  # noqa: E402
from otfusion_jax.models import build, capture_activations, init  # noqa: E402

# The reference (NumPy + POT, a test extra) is imported on first use: POT
# imports torch, which would inflate the RSS of the --rss-child processes.
reference: Any = None
to_torch_layers: Any = None
_REFERENCE_IMPORT_ERROR = ""


def _load_reference() -> bool:
    """Imports ``tests/reference_otfusion.py`` and the layout helper once; False if POT is missing."""
    global reference, to_torch_layers, _REFERENCE_IMPORT_ERROR  # pylint: disable=global-statement
    if reference is None and not _REFERENCE_IMPORT_ERROR:
        try:
            import reference_otfusion  # pylint: disable=import-outside-toplevel
            from fusion_helpers import to_torch_layers as _to_torch  # pylint: disable=import-outside-toplevel
        except ImportError as e:  # pragma: no cover
            _REFERENCE_IMPORT_ERROR = repr(e)
        else:
            reference, to_torch_layers = reference_otfusion, _to_torch
    return reference is not None

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

__all__ = ["main", "device_info", "run"]

SOLVERS: dict[str, dict[str, Any]] = {
    # The default FusionConfig: exact_backend="auto" (ot.resolve_backend: "native" on a CPU where it builds, else
    # "lapjv" or "host"; "auction" elsewhere).
    "exact-auto": dict(solver="exact", exact_backend="auto"),
    "exact-device": dict(solver="exact", exact_backend="device"),
    "exact-auction": dict(solver="exact", exact_backend="auction"),
    "exact-native": dict(solver="exact", exact_backend="native"),
    "exact-host": dict(solver="exact", exact_backend="host"),
    "exact-lapjv": dict(solver="exact", exact_backend="lapjv"),
    # Cost divided by its mean, epsilon 0.01 of that: the reference gets the same problem.
    "sinkhorn": dict(solver="sinkhorn", normalize_cost="mean", epsilon=0.01, sinkhorn_threshold=1e-3),
}
SINKHORN_MAX_ITERATIONS = 2000

# --quick times only these (compiling dominates a tiny run: about 2-15 s per
# configuration on a 2-core CPU, most for the while loops of the device
# Hungarian and Sinkhorn over ResNet18's 13 plans).
QUICK_PLAN: dict[str, dict[str, list[str]]] = {
    "mlpnet": {"weights": [s for s in SOLVERS if s not in ("exact-auto", "exact-lapjv", "exact-native")],
               "activations": ["exact-host"]},
    "vgg11": {"weights": ["exact-host"]},
    "resnet18": {"weights": ["exact-host"]},
    "vit": {"weights": ["exact-host", "sinkhorn"], "activations": ["exact-host"]},
}


def available_solvers() -> list[str]:
    """Every solver of ``SOLVERS`` that runs here (``exact-lapjv`` needs the optional lapjv package,
    ``exact-native`` a CPU backend and a C++ compiler: ``otfusion_jax.native``)."""
    native_ok = jax.default_backend() == "cpu" and native.available()
    return [s for s in SOLVERS if (s != "exact-lapjv" or ot.has_lapjv()) and (s != "exact-native" or native_ok)]

# The ORIGINAL OTFusion code (sidak/otfusion, PyTorch 2.13 CPU + POT 0.9.7, its
# README flags, its fusion call only, warm medians) as measured in issue 15 on
# the project's 2-core CPU: seconds per pair and the peak RSS of its process.
# Only cases whose shapes match the original's models carry an anchor (ResNet18:
# the original's resnet18_nobias_nobn at full width, as the bench's). The issue fused trained
# MNIST MLPNet parents, the bench random ones: exact solver times depend
# somewhat on the costs, so the MLPNet ratio is an estimate.
ANCHOR_SOURCE = (
    "issue 15: original OTFusion (PyTorch 2.13 CPU + POT 0.9.7, README flags, fusion call only, warm median), "
    "measured on this project's 2-core CPU"
)
ORIGINAL_ANCHOR: dict[tuple[str, str], dict[str, Any]] = {
    ("mlpnet", "weights"): {"fuse_s": 0.67, "peak_rss_gb": 1.29, "note": "trained MNIST parents"},
    ("mlpnet", "activations"): {"fuse_s": 0.42, "peak_rss_gb": 0.60, "note": "200 samples"},
    ("vgg11", "weights"): {"fuse_s": 0.43, "peak_rss_gb": 0.59, "note": "bias-free, CIFAR shapes"},
    ("resnet18", "activations"): {"fuse_s": 253.0, "peak_rss_gb": 8.75, "note": "no BN, no bias, 200 samples"},
}


def anchor_for(case: ModelCase, mode: str, quick: bool, samples: int = 200) -> dict[str, Any] | None:
    """The original's figures for this case, or None (quick runs, other shapes, no anchor)."""
    if quick or (case.name in ("vgg11", "resnet18") and dict(case.options).get("width") != 1.0):
        return None
    if mode == "activations" and samples != 200:  # the original's figures are for 200 samples
        return None
    return ORIGINAL_ANCHOR.get((case.name, mode))


# ----------------------------------------------------------------------------- device and memory


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info() -> dict[str, Any]:
    """The machine a figure comes from: CPU model, cores, JAX backend, version and devices."""
    devs = jax.devices()
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores_usable = os.cpu_count()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover
        jaxlib_version = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": cores_usable,
        "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "device_kind": devs[0].device_kind,
        "device_count": len(devs),
        "python": platform.python_version(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _rss_mb() -> float:
    if psutil is not None:
        return psutil.Process().memory_info().rss / 2**20
    # Fallback: current RSS from /proc (Linux).
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover
        return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _hwm_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status, else ``ru_maxrss``.

    ``ru_maxrss`` survives ``execve``: a child started by ``subprocess`` reports
    at least its parent's peak; ``VmHWM`` belongs to the new address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):  # pragma: no cover
        pass
    return _maxrss_mb()


def _device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (not every backend has memory stats)
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


class RSSMonitor:
    """Samples the process RSS in a thread; ``peak_mb`` and ``delta_mb`` after the block."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.before_mb = self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RSSMonitor:
        self.before_mb = self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.before_mb

    def as_dict(self) -> dict[str, float]:
        out = {
            "rss_before_mb": round(self.before_mb, 1),
            "rss_peak_mb": round(self.peak_mb, 1),
            "rss_delta_mb": round(self.delta_mb, 1),
            "maxrss_process_mb": round(_maxrss_mb(), 1),
        }
        peak = _device_peak_bytes()
        if peak is not None:
            out["device_peak_mb"] = round(peak / 2**20, 1)
        return out


# ----------------------------------------------------------------------------- timing


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], repeats: int, budget_s: float) -> dict[str, Any]:
    """Median of warm calls of ``fn`` (one untimed warm-up), fewer repeats if slow.

    Args:
      fn: a thunk whose result is blocked on.
      repeats: the number of timed calls wanted.
      budget_s: at most about this many seconds of timed calls: a slow
        function is timed fewer times (at least once).

    Returns:
      ``median_ms``, ``min_ms``, ``repeats`` (actually done) and ``times_ms``.
    """
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _block(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "repeats": n,
        "repeats_requested": repeats,
        "times_ms": [round(t, 3) for t in times],
    }


def compile_jitted(jitted: Any, *args: Any) -> tuple[Callable[..., Any], float]:
    """Traces, lowers and compiles ``jitted`` for ``args``: (compiled callable, seconds)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One benchmarked architecture.

    Attributes:
      name: registry name.
      input_shape: (H, W, C).
      options: ``build`` options.
      torch_kinds: layers for the reference, (name, "dense" | "conv" | "flatten"),
        or None where the reference does not support the model.
      flatten_hw: spatial size at the conv->dense flatten (reference).
      label: how the table names it.
    """

    name: str
    input_shape: tuple[int, int, int]
    options: tuple[tuple[str, Any], ...]
    torch_kinds: tuple[tuple[str, str], ...] | None
    flatten_hw: tuple[int, int] | None
    label: str


def model_cases(quick: bool, vgg_width: float) -> list[ModelCase]:
    """The benchmarked models (tiny in quick mode)."""
    if quick:
        mlp_widths, vgg_width, res_width, res_hw = (32, 16, 8), 0.0625, 0.0625, (16, 16, 3)
        vit_depth, vit_dim = 1, 8
    else:
        mlp_widths, res_width, res_hw = (400, 200, 100), 1.0, (32, 32, 3)
        vit_depth, vit_dim = 4, 64
    mlp_names = [f"fc{i + 1}" for i in range(len(mlp_widths) + 1)]
    vgg_kinds = tuple((f"conv{i}", "conv") for i in range(1, 9)) + (("fc", "flatten"),)
    return [
        ModelCase(
            "mlpnet",
            (28, 28, 1),
            (("widths", mlp_widths), ("bias", False)),
            tuple((n, "dense") for n in mlp_names),
            None,
            f"MLPNet 784-{'-'.join(map(str, mlp_widths))}-10",
        ),
        ModelCase(
            "vgg11",
            (32, 32, 3),
            (("width", vgg_width), ("bias", False), ("norm", False)),
            vgg_kinds,
            (1, 1),
            f"VGG11 x{vgg_width:g} 32x32x3",
        ),
        ModelCase(
            "resnet18",
            res_hw,
            (("width", res_width), ("bias", False), ("norm", False)),  # the original's resnet18_nobias_nobn
            None,
            None,
            f"ResNet18 x{res_width:g} {res_hw[0]}x{res_hw[1]}x3 (no BN, no bias)",
        ),
        ModelCase(  # configs/fashion_vit.py's ViT: head-structured plans, a permutation-only stream
            "vit",
            (28, 28, 1),
            (("depth", vit_depth), ("embed_dim", vit_dim), ("num_heads", 4), ("mlp_dim", 2 * vit_dim),
             ("patch_size", 7), ("bias", True)),
            None,
            None,
            f"ViT depth {vit_depth}, width {vit_dim}, 4 heads, 28x28x1",
        ),
    ]


def _parents(case: ModelCase, k: int, seed: int):
    model, spec = build(case.name, input_shape=case.input_shape, num_classes=10, **dict(case.options))
    parents = [init(model, jax.random.key(seed + i), case.input_shape) for i in range(k)]
    return model, spec, parents


def _config(solver: str, mode: str) -> otf.FusionConfig:
    return otf.FusionConfig(mode=mode, sinkhorn_max_iterations=SINKHORN_MAX_ITERATIONS, **SOLVERS[solver])


def _pair_fn(spec, cfg: otf.FusionConfig) -> Callable[[Any, Any], Any]:
    """``(parents, activations) -> otf.fuse(...)`` with spec and config closed over (for jax.jit)."""

    def fn(parents, acts):
        return otf.fuse(parents, spec, cfg, activations=acts)

    return fn


def _sinkhorn_summary(aux: otf.FusionAux) -> dict[str, Any]:
    iters, conv = [], []
    for info in aux.info:
        if info is None:
            continue
        for pi in info.values():
            iters.append(int(np.max(np.asarray(pi.n_iters))))
            conv.append(bool(np.all(np.asarray(pi.converged))))
    return {"sinkhorn_max_iters": max(iters) if iters else None, "sinkhorn_all_converged": all(conv)}


def _auction_summary(aux: otf.FusionAux) -> dict[str, Any]:
    """Bidding rounds per layer of the first aligned parent (``PlanInfo.n_iters``) and convergence."""
    first = next(info for info in aux.info if info is not None)
    rounds = {name: int(np.max(np.asarray(pi.n_iters))) for name, pi in first.items()}
    conv = all(bool(np.all(np.asarray(pi.converged))) for info in aux.info if info for pi in info.values())
    return {"auction_rounds": rounds, "auction_all_converged": conv}


def _max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the reference


def _reference_inputs(case: ModelCase, spec, parents, acts, mode: str) -> dict[str, Any]:
    """Torch-layout weights (and activations) of parent A (aligned) and B (the target)."""
    kinds = list(case.torch_kinds)
    wa, _ = to_torch_layers(parents[0], kinds, case.flatten_hw)
    wb, _ = to_torch_layers(parents[1], kinds, case.flatten_hw)
    inputs: dict[str, Any] = {"weights_a": wa, "weights_b": wb}
    if case.flatten_hw is not None:
        c = wa[-1].shape[1] // (case.flatten_hw[0] * case.flatten_hw[1])
        inputs["flatten_shapes"] = {len(kinds) - 1: (c, *case.flatten_hw)}
    if mode == "activations":
        inputs["acts_a"] = [layouts.acts_to_torch(np.asarray(acts[0][name][0])) for name in spec.plans]
        inputs["acts_b"] = [layouts.acts_to_torch(np.asarray(acts[1][name][0])) for name in spec.plans]
    return inputs


def _reference_options(solver: str, mode: str) -> dict[str, Any]:
    # Same output-layer rule as the JAX config (``align_output`` <-> ``align_last``).
    # float32 like the original (and like us); the tests run the reference in float64.
    opts: dict[str, Any] = {
        "mode": mode, "ensemble_step": 0.5, "align_last": _config(solver, mode).align_output, "dtype": np.float32,
    }
    if solver == "sinkhorn":
        s = SOLVERS["sinkhorn"]
        opts.update(
            solver="sinkhorn",
            normalize_cost=s["normalize_cost"],
            reg=s["epsilon"],
            sinkhorn_threshold=s["sinkhorn_threshold"],
            sinkhorn_max_iter=SINKHORN_MAX_ITERATIONS,
        )
    return opts


# ----------------------------------------------------------------------------- benchmarks


def _interleaved_ratios(
    ref_call: Callable[[], Any],
    jax_calls: dict[str, Callable[[], Any]],
    rounds: int,
    budget_s: float,
    round_s: float,
) -> dict[str, Any]:
    """Reference / JAX time ratios from alternating single calls (robust to a changing machine load).

    Each round times one reference call, then one call of every JAX solver;
    the ratio of a round compares calls made within about a second of each
    other. Returns per solver the median ratio and the per-round ratios.
    """
    n = max(1, min(rounds, int(budget_s / max(round_s, 1e-9))))
    ratios: dict[str, list[float]] = {s: [] for s in jax_calls}
    for _ in range(n):
        t0 = time.perf_counter()
        ref_call()
        ref_s = time.perf_counter() - t0
        for s, call in jax_calls.items():
            t0 = time.perf_counter()
            _block(call())
            ratios[s].append(ref_s / (time.perf_counter() - t0))
    return {s: {"median": statistics.median(r), "rounds": [round(x, 3) for x in r]} for s, r in ratios.items()}


def fresh_process_run(case: ModelCase, mode: str, solver: str, args: argparse.Namespace) -> dict[str, Any]:
    """One pair fused in a new Python process (``--rss-child``): its peak RSS and cold compile time.

    The figure comparable to the original's peak RSS: a process that imports
    the library, builds both parents (and captures their activations),
    compiles and runs the fusion a few times, and nothing else (no reference,
    no POT, no torch, no other case's buffers).
    """
    with tempfile.TemporaryDirectory() as tmp:
        # The parents reach the child as a file, as a checkpoint reaches the CLI
        # (initialising them there would add Flax's init to its peak).
        _, _, parents = _parents(case, 2, args.seed)
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(parents)]
        np.savez(Path(tmp) / "parents.npz", *leaves)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", case.name, mode, solver,
               "--rss-child-parents", str(Path(tmp) / "parents.npz"),
               "--samples", str(args.samples), "--vgg-width", str(args.vgg_width), "--seed", str(args.seed)]
        if args.quick:
            cmd.append("--quick")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ), check=False)
        except subprocess.TimeoutExpired:
            return {"status": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "error", "error": proc.stderr[-2000:]}
    return {**json.loads(lines[-1]), "status": "ok"}


def rss_child(args: argparse.Namespace) -> int:
    """``--rss-child MODEL MODE SOLVER``: fuse one pair in this fresh process, print one JSON line."""
    model_name, mode, solver = args.rss_child
    rss_import = _hwm_mb()
    case = {c.name: c for c in model_cases(args.quick, args.vgg_width)}[model_name]
    model, spec = build(case.name, input_shape=case.input_shape, num_classes=10, **dict(case.options))
    if args.rss_child_parents:  # the structure from an abstract init, the values from the file
        shapes = jax.eval_shape(lambda k: init(model, k, case.input_shape), jax.random.key(0))
        treedef = jax.tree_util.tree_structure(shapes)
        with np.load(args.rss_child_parents) as f:
            leaves = [jnp.asarray(f[f"arr_{i}"]) for i in range(len(f.files))]
        half = len(leaves) // 2
        parents = [jax.tree_util.tree_unflatten(treedef, leaves[:half]),
                   jax.tree_util.tree_unflatten(treedef, leaves[half:])]
    else:
        _, _, parents = _parents(case, 2, args.seed)
    acts = None
    if mode == "activations":
        x = jax.random.normal(jax.random.key(1234), (args.samples, *case.input_shape), jnp.float32)
        cap = jax.jit(lambda v, x_: capture_activations(model, v, x_))
        acts = [_block(cap(p, x)) for p in parents]
    _block(parents)
    rss_inputs = _hwm_mb()
    t0 = time.perf_counter()
    compiled = jax.jit(_pair_fn(spec, _config(solver, mode))).lower(parents, acts).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        _block(compiled(parents, acts))
    print(json.dumps({
        "maxrss_mb": round(_hwm_mb(), 1),
        "maxrss_after_import_mb": round(rss_import, 1),
        "maxrss_after_inputs_mb": round(rss_inputs, 1),
        "cold_compile_s": round(compile_s, 3),
        "torch_imported": "torch" in sys.modules,
        "pot_imported": "ot" in sys.modules,
    }))
    return 0


def bench_pair(
    case: ModelCase, mode: str, solvers: Sequence[str], args: argparse.Namespace, dev: dict[str, Any]
) -> list[dict[str, Any]]:
    """One pair of ``case`` in ``mode``: every solver, then the reference."""
    results = []
    model, spec, parents = _parents(case, 2, args.seed)
    common = {"kind": "pair", "model": case.name, "model_label": case.label, "mode": mode}
    acts = None
    capture: dict[str, Any] = {}
    if mode == "activations":
        x = jax.random.normal(jax.random.key(1234), (args.samples, *case.input_shape), jnp.float32)
        cap = jax.jit(lambda v, x_: capture_activations(model, v, x_))
        compiled_cap, cap_compile = compile_jitted(cap, parents[0], x)
        timing = time_calls(lambda: [compiled_cap(p, x) for p in parents], args.repeats, args.budget_s)
        acts = [compiled_cap(p, x) for p in parents]
        capture = {
            "samples": args.samples,
            "capture_compile_s": round(cap_compile, 3),
            "capture_ms": timing["median_ms"],
            "capture_note": "both parents, one jitted forward pass each",
        }
    # Host-side checks that otf.fuse runs on concrete inputs (outside any jit).
    check = time_calls(
        lambda: (otf.check_parents(parents, spec), otf.check_finite(parents)), args.repeats, args.budget_s
    )
    jax_times: dict[str, float] = {}
    jax_calls: dict[str, Callable[[], Any]] = {}
    for solver in solvers:
        cfg = _config(solver, mode)
        entry = {**common, "solver": solver, **capture, "check_ms": check["median_ms"], "device": dev}
        try:
            jitted = jax.jit(_pair_fn(spec, cfg))
            with RSSMonitor() as mon:
                compiled, comp_s = compile_jitted(jitted, parents, acts)
                timing = time_calls(lambda: compiled(parents, acts), args.repeats, args.budget_s)
            fused, aux = compiled(parents, acts)
            entry.update(compile_s=round(comp_s, 3), fuse_ms=timing["median_ms"], timing=timing, **mon.as_dict())
            if capture:  # what a user waits for: both parents' activations, then the fusion
                entry["end_to_end_ms"] = round(capture["capture_ms"] + timing["median_ms"], 3)
            anchor = anchor_for(case, mode, args.quick, args.samples)
            if anchor is not None:
                entry["original_anchor"] = {
                    **anchor,
                    "source": ANCHOR_SOURCE,
                    "speedup": anchor["fuse_s"] * 1e3 / timing["median_ms"],
                }
                if capture:
                    entry["original_anchor"]["speedup_end_to_end"] = anchor["fuse_s"] * 1e3 / entry["end_to_end_ms"]
            if args.rss_subprocess:
                entry["fresh_process"] = fresh_process_run(case, mode, solver, args)
            if solver == "sinkhorn":
                entry.update(_sinkhorn_summary(aux))
            elif solver == "exact-auction":
                entry.update(_auction_summary(aux))
            jax_times[solver] = timing["median_ms"]
            jax_calls[solver] = lambda compiled=compiled: compiled(parents, acts)
            entry["_fused"] = fused
        except Exception as e:  # noqa: BLE001  (report it, go on with the others)
            entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))
        entry.setdefault("status", "ok")
        entry["loadavg"] = _loadavg()
        results.append(entry)
        _progress(entry)

    # The NumPy + POT reference on the same pair.
    if args.no_reference:
        pass
    elif case.torch_kinds is None or not _load_reference():
        why = (
            "the reference supports chains of dense/conv layers only (no residual streams, no BatchNorm)"
            if case.torch_kinds is None
            else f"reference unavailable: {_REFERENCE_IMPORT_ERROR}"
        )
        results.append({**common, "kind": "reference", "status": "unsupported", "reason": why, "device": dev})
    else:
        inputs = _reference_inputs(case, spec, parents, acts, mode)
        for solver in ("exact", "sinkhorn"):
            jax_solvers = [s for s in solvers if s.startswith(solver)]
            if not jax_solvers:
                continue
            opts = _reference_options(jax_solvers[0], mode)
            entry = {**common, "kind": "reference", "solver": f"reference-{solver}", "device": dev}
            try:
                with RSSMonitor() as mon:
                    timing = time_calls(lambda: reference.fuse_reference(**inputs, **opts), args.ref_repeats, args.budget_s)
                fused_w, _, _ = reference.fuse_reference(**inputs, **opts)
                entry.update(ref_ms=timing["median_ms"], timing=timing, **mon.as_dict())
                entry["speedup"] = {s: timing["median_ms"] / jax_times[s] for s in jax_solvers if s in jax_times}
                entry["speedup_interleaved"] = _interleaved_ratios(
                    lambda: reference.fuse_reference(**inputs, **opts),
                    {s: jax_calls[s] for s in jax_solvers if s in jax_calls},
                    rounds=args.interleave_rounds,
                    budget_s=args.budget_s,
                    round_s=(timing["median_ms"] + sum(jax_times.get(s, 0.0) for s in jax_solvers)) / 1e3,
                )
                diffs = {}
                for r in results:
                    if r.get("solver") in jax_solvers and "_fused" in r:
                        jw, _ = to_torch_layers(r["_fused"], list(case.torch_kinds), case.flatten_hw)
                        diffs[r["solver"]] = _max_abs_diff(jw, fused_w)
                entry["max_abs_diff_vs_jax"] = diffs
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001
                entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))
            entry["loadavg"] = _loadavg()
            results.append(entry)
            _progress(entry)
    for r in results:
        r.pop("_fused", None)
    return results


def bench_vmap(case: ModelCase, counts: Sequence[int], solvers: Sequence[str], args, dev) -> list[dict[str, Any]]:
    """Throughput of ``jit(vmap(fuse))`` over B MLPNet pairs (weights mode)."""
    results = []
    model, spec = build(case.name, input_shape=case.input_shape, num_classes=10, **dict(case.options))
    init_many = jax.jit(jax.vmap(lambda k: init(model, k, case.input_shape)))
    for b in counts:
        keys = jax.random.split(jax.random.key(args.seed + 7), 2 * b)
        pa, pb = _block(init_many(keys[:b])), _block(init_many(keys[b:]))
        for solver in solvers:
            cfg = _config(solver, "weights")
            entry = {"kind": "vmap", "model": case.name, "model_label": case.label, "pairs": b, "solver": solver}
            try:
                pair = _pair_fn(spec, cfg)
                jitted = jax.jit(jax.vmap(lambda a, b_, pair=pair: pair([a, b_], None)))
                with RSSMonitor() as mon:
                    compiled, comp_s = compile_jitted(jitted, pa, pb)
                    repeats = args.repeats if b <= 8 else max(2, args.repeats // 4)
                    timing = time_calls(lambda pa=pa, pb=pb: compiled(pa, pb), repeats, args.budget_s)
                entry.update(
                    compile_s=round(comp_s, 3),
                    batch_ms=timing["median_ms"],
                    ms_per_pair=timing["median_ms"] / b,
                    pairs_per_s=b / (timing["median_ms"] / 1e3),
                    timing=timing,
                    **mon.as_dict(),
                    status="ok",
                )
            except Exception as e:  # noqa: BLE001
                entry.update(status="error", error=f"{type(e).__name__}: {e}")
            entry["loadavg"] = _loadavg()
            entry["device"] = dev
            results.append(entry)
            _progress(entry)
        del pa, pb
    return results


def bench_k(case: ModelCase, ks: Sequence[int], solvers: Sequence[str], args, dev) -> list[dict[str, Any]]:
    """K parents aligned onto one target and averaged (weights mode)."""
    results = []
    for k in ks:
        _, spec, parents = _parents(case, k, args.seed + 100)
        for solver in solvers:
            cfg = _config(solver, "weights")
            entry = {"kind": "k_models", "model": case.name, "model_label": case.label, "k": k, "solver": solver}
            try:
                jitted = jax.jit(_pair_fn(spec, cfg))
                with RSSMonitor() as mon:
                    compiled, comp_s = compile_jitted(jitted, parents, None)
                    timing = time_calls(lambda: compiled(parents, None), args.repeats, args.budget_s)
                entry.update(
                    compile_s=round(comp_s, 3),
                    fuse_ms=timing["median_ms"],
                    ms_per_aligned_parent=timing["median_ms"] / (k - 1),
                    timing=timing,
                    **mon.as_dict(),
                    status="ok",
                )
            except Exception as e:  # noqa: BLE001
                entry.update(status="error", error=f"{type(e).__name__}: {e}")
            entry["loadavg"] = _loadavg()
            entry["device"] = dev
            results.append(entry)
            _progress(entry)
    return results


# ----------------------------------------------------------------------------- output


def _progress(entry: dict[str, Any]) -> None:
    keys = ("kind", "model", "mode", "solver", "pairs", "k", "compile_s", "fuse_ms", "batch_ms", "ref_ms", "status")
    print("  " + " ".join(f"{k}={entry[k]:.4g}" if isinstance(entry.get(k), float) else f"{k}={entry[k]}"
                          for k in keys if k in entry), file=sys.stderr, flush=True)


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _original_table(pairs: list[dict[str, Any]], refs: dict[tuple, dict[str, Any]]) -> list[str]:
    """Rows "against the original": the issue-15 anchor, every solver's time and both ratios, compile, RSS."""
    cases: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in pairs:
        if r["status"] == "ok" and "original_anchor" in r:
            cases.setdefault((r["model"], r["mode"]), {})[r["solver"]] = r
    if not cases:
        return []
    cols = [s for s in SOLVERS if any(s in c for c in cases.values())]
    lines = ["", "### Against the original (anchor: issue 15, same 2-core CPU)", "",
             "Each cell: ms (original / ours, reference / ours). Compile: the default's trace+lower+compile in this "
             "process and cold in a fresh one. Peak RSS: a fresh process fusing this pair (original's in brackets).", "",
             "| case | original (anchor) | " + " | ".join(f"ours {s}" for s in cols)
             + " | compile s (this / fresh) | peak RSS MB, fresh process (original) |",
             "|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for (model, mode), by in cases.items():
        first = next(iter(by.values()))
        anchor = first["original_anchor"]
        cells = []
        for s in cols:
            r = by.get(s)
            if r is None:
                cells.append("-")
                continue
            ref = refs.get((model, mode, "reference-" + s.split("-")[0]))
            vs_ref = ref["speedup"].get(s) if ref and ref.get("status") == "ok" else None
            cell = (f"{_f(r['fuse_ms'])} ({_f(r['original_anchor']['speedup'], 3)}x, "
                    f"{_f(vs_ref, 3) + 'x' if vs_ref else '-'})")
            if "end_to_end_ms" in r:  # activations: with both parents' capture
                cell += f"; with capture {_f(r['end_to_end_ms'])} ({_f(r['original_anchor']['speedup_end_to_end'], 3)}x)"
            cells.append(cell)
        default = by.get("exact-auto", first)
        fresh = default.get("fresh_process", {})
        lines.append(
            f"| {first['model_label']} by {mode} | {anchor['fuse_s'] * 1e3:.0f} ms | " + " | ".join(cells)
            + f" | {_f(default['compile_s'])} / {_f(fresh.get('cold_compile_s'))} | "
            f"{_f(fresh.get('maxrss_mb'), 4)} ({anchor['peak_rss_gb'] * 1024:.0f}) |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a report (what ``main`` prints)."""
    dev = report["device"]
    lines = [
        f"Device: {dev['cpu_model']}, {dev['cpu_cores_usable']} usable cores; JAX {dev['jax_version']} "
        f"backend {dev['jax_backend']} ({dev['device_kind']} x{dev['device_count']}); "
        f"quick={report['quick']}; load average at start {report['loadavg_start']}",
        "",
        "### One pair (jit, warm; median ms)",
        "",
        "| model | mode | solver | fusion ms | compile s | capture ms | host checks ms | reference ms | "
        "reference / JAX (medians) | (interleaved) | max abs diff vs ref | peak RSS MB (+delta) | repeats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = [r for r in report["results"] if r["kind"] == "pair"]
    refs = {(r["model"], r["mode"], r.get("solver")): r for r in report["results"] if r["kind"] == "reference"}
    for r in pairs:
        ref = refs.get((r["model"], r["mode"], "reference-" + r["solver"].split("-")[0]))
        unsupported = refs.get((r["model"], r["mode"], None))
        if r["status"] != "ok":
            lines.append(f"| {r['model_label']} | {r['mode']} | {r['solver']} | {r['status']}: {r.get('error', '')[:80]} "
                         "| | | | | | | | | |")
            continue
        ref_ms = ratio = inter = diff = "-"
        if ref is not None and ref["status"] != "ok":
            ref_ms = ref["status"]
        elif ref is not None:
            ref_ms = _f(ref["ref_ms"])
            ratio = _f(ref["speedup"].get(r["solver"]), 3) + "x" if r["solver"] in ref["speedup"] else "-"
            if r["solver"] in ref.get("speedup_interleaved", {}):
                inter = _f(ref["speedup_interleaved"][r["solver"]]["median"], 3) + "x"
            diff = _f(ref["max_abs_diff_vs_jax"].get(r["solver"]), 2)
        elif unsupported is not None:
            ref_ms = "unsupported"
        lines.append(
            f"| {r['model_label']} | {r['mode']} | {r['solver']} | {_f(r['fuse_ms'])} | {_f(r['compile_s'])} | "
            f"{_f(r.get('capture_ms'))} | {_f(r['check_ms'])} | {ref_ms} | {ratio} | {inter} | {diff} | "
            f"{_f(r['rss_peak_mb'], 4)} (+{_f(r['rss_delta_mb'], 3)}) | {r['timing']['repeats']} |"
        )
    lines += _original_table(pairs, refs)
    vm = [r for r in report["results"] if r["kind"] == "vmap"]
    if vm:
        lines += ["", "### vmap over MLPNet pairs (weights mode)", "",
                  "| pairs | solver | batch ms | ms / pair | pairs / s | compile s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in vm:
            if r["status"] != "ok":
                lines.append(f"| {r['pairs']} | {r['solver']} | {r['status']} | | | | |")
                continue
            lines.append(f"| {r['pairs']} | {r['solver']} | {_f(r['batch_ms'])} | {_f(r['ms_per_pair'])} | "
                         f"{_f(r['pairs_per_s'])} | {_f(r['compile_s'])} | {_f(r['rss_peak_mb'], 4)} |")
    km = [r for r in report["results"] if r["kind"] == "k_models"]
    if km:
        lines += ["", "### K parents onto one target (MLPNet, weights mode)", "",
                  "| K | solver | fusion ms | ms / aligned parent | compile s |", "|---|---|---|---|---|"]
        for r in km:
            if r["status"] != "ok":
                lines.append(f"| {r['k']} | {r['solver']} | {r['status']} | | |")
                continue
            lines.append(f"| {r['k']} | {r['solver']} | {_f(r['fuse_ms'])} | {_f(r['ms_per_aligned_parent'])} | "
                         f"{_f(r['compile_s'])} |")
    notes = [r for r in report["results"] if r["kind"] == "reference" and r["status"] == "unsupported"]
    if notes:
        lines += ["", *{f"Reference: {r['model_label']}: {r['reason']}." for r in notes}]
    return "\n".join(lines)


def write_json_atomic(obj: Any, path: Path) -> None:
    """Writes JSON to a temporary file in the same folder, then ``os.replace``s it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models and counts: a smoke test (< 1 min)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json", help="JSON results (atomic write)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables here")
    p.add_argument("--models", nargs="+", default=["mlpnet", "vgg11", "resnet18", "vit"])
    p.add_argument("--modes", nargs="+", default=["weights", "activations"])
    p.add_argument("--solvers", nargs="+", default=None, choices=list(SOLVERS),
                   help="default: all (quick: the few of QUICK_PLAN)")
    p.add_argument("--vmap-solvers", nargs="+", default=None, choices=list(SOLVERS),
                   help="default: --solvers, or all (quick: exact-host)")
    p.add_argument("--k-solvers", nargs="+", default=None, choices=list(SOLVERS),
                   help="default: --solvers, or all (quick: exact-host)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10, quick 2)")
    p.add_argument("--ref-repeats", type=int, default=None, help="timed reference calls (default 3, quick 1)")
    p.add_argument("--budget-s", type=float, default=None, help="max seconds of timed calls per figure")
    p.add_argument("--samples", type=int, default=None, help="activation samples (default 200, quick 16)")
    p.add_argument("--vgg-width", type=float, default=1.0, help="VGG11 width multiplier (quick: 1/16)")
    p.add_argument("--vmap-counts", type=int, nargs="*", default=None, help="default 1 8 64 256 (quick 1 2)")
    p.add_argument("--k-values", type=int, nargs="*", default=None, help="default 2 4 8 (quick 3)")
    p.add_argument("--interleave-rounds", type=int, default=None,
                   help="rounds of alternating reference / JAX calls for the ratio (default 10, quick 1)")
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy + POT reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-subprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="also fuse each pair in a fresh process for its peak RSS and cold compile time "
                        "(default: on, quick: off)")
    p.add_argument("--rss-child", nargs=3, metavar=("MODEL", "MODE", "SOLVER"), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--rss-child-parents", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_subprocess is None:
        args.rss_subprocess = not args.quick
    q = args.quick
    defaults = dict(repeats=2 if q else 10, interleave_rounds=1 if q else 10, ref_repeats=1 if q else 3, budget_s=2.0 if q else 20.0,
                    samples=16 if q else 200, vmap_counts=[2] if q else [1, 8, 64, 256],
                    k_values=[3] if q else [2, 4, 8])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fallback = list(args.solvers) if args.solvers else (["exact-host"] if q else available_solvers())
    args.vmap_solvers = args.vmap_solvers or fallback
    args.k_solvers = args.k_solvers or fallback
    return args


def _solvers_for(args: argparse.Namespace, model: str, mode: str) -> list[str]:
    """Solvers to time for one (model, mode): ``--solvers``, or the quick plan's few."""
    if args.solvers is not None:
        return list(args.solvers)
    if args.quick:
        return list(QUICK_PLAN.get(model, {}).get(mode, []))
    return available_solvers()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; writes the JSON after every section (atomic), returns the report."""
    dev = device_info()
    report: dict[str, Any] = {
        "schema": 1,
        "quick": args.quick,
        "device": dev,
        "loadavg_start": _loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "settings": {
            "repeats": args.repeats, "ref_repeats": args.ref_repeats, "budget_s": args.budget_s,
            "samples": args.samples, "solvers": SOLVERS,
            "sinkhorn_max_iterations": SINKHORN_MAX_ITERATIONS,
            "statistic": "median of warm calls, block_until_ready; compile (trace+lower+compile) apart",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "original_anchor": {"source": ANCHOR_SOURCE, **{f"{m}/{mode}": a for (m, mode), a in ORIGINAL_ANCHOR.items()}},
            "rss_subprocess": args.rss_subprocess,
        },
        "results": [],
    }
    cases = {c.name: c for c in model_cases(args.quick, args.vgg_width)}
    t_start = time.perf_counter()
    for name in args.models:
        for mode in args.modes:
            solvers = _solvers_for(args, name, mode)
            if not solvers:
                continue
            print(f"[bench] {cases[name].label}, {mode}", file=sys.stderr, flush=True)
            report["results"] += bench_pair(cases[name], mode, solvers, args, dev)
            write_json_atomic(report, args.out)
    if args.vmap_counts:
        print("[bench] vmap throughput", file=sys.stderr, flush=True)
        report["results"] += bench_vmap(cases["mlpnet"], args.vmap_counts, args.vmap_solvers, args, dev)
        write_json_atomic(report, args.out)
    if args.k_values:
        print("[bench] K parents", file=sys.stderr, flush=True)
        report["results"] += bench_k(cases["mlpnet"], args.k_values, args.k_solvers, args, dev)
    report["loadavg_end"] = _loadavg()
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["maxrss_process_mb"] = round(_maxrss_mb(), 1)
    write_json_atomic(report, args.out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs, writes ``--out`` (and ``--markdown``), prints the Markdown tables."""
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    report = run(args)
    md = markdown(report)
    print(md)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md + "\n")
    return 0 if all(r.get("status") in ("ok", "unsupported") for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
