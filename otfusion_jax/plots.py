"""PNG plots of a fusion run (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from otfusion_jax import io_utils

__all__ = ["accuracy_plot", "barrier_plot", "ot_cost_plot"]


def _figure():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def _save(fig, path: str) -> str:
    tmp = io_utils.temp_name(path)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def accuracy_plot(path: str, rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Horizontal bars: test accuracy (%) of every row of a results table."""
    plt = _figure()
    rows = [r for r in rows if r.get("accuracy") is not None]
    labels = [r["method"] for r in rows][::-1]
    accs = [100 * r["accuracy"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.2))
    colors = ["#4c72b0" if "OT" in m else "#8c8c8c" if "parent" in m else "#dd8452" for m in labels]
    ax.barh(labels, accs, color=colors)
    for y, a in enumerate(accs):
        ax.text(a + 0.5, y, f"{a:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title or "accuracy per method")
    out = _save(fig, path)
    plt.close(fig)
    return out


def barrier_plot(path: str, curves: Mapping[str, Mapping[str, Sequence[float]]], title: str = "") -> str:
    """Test loss and accuracy along (1 - t) A + t B, one line per curve (e.g. before / after alignment)."""
    plt = _figure()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, c in curves.items():
        ax_l.plot(c["t"], c["loss"], marker="o", ms=3, label=name)
        ax_a.plot(c["t"], [100 * a for a in c["accuracy"]], marker="o", ms=3, label=name)
    ax_l.set_xlabel("t  (0: parent A, 1: parent B)")
    ax_l.set_ylabel("test loss")
    ax_a.set_xlabel("t  (0: parent A, 1: parent B)")
    ax_a.set_ylabel("test accuracy (%)")
    ax_a.legend(fontsize=8)
    fig.suptitle(title or "linear interpolation between two parents")
    out = _save(fig, path)
    plt.close(fig)
    return out


def ot_cost_plot(path: str, costs: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Per-layer transport cost, one line per OT method."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, per_layer in costs.items():
        layers = list(per_layer)
        ax.plot(range(len(layers)), [per_layer[k] for k in layers], marker="o", label=name)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("transport cost <T, C>")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(title or "OT cost per layer")
    out = _save(fig, path)
    plt.close(fig)
    return out
