"""Many fusions at once: a batch of parent pairs sharded across devices.

``fuse`` is pure, so ``jax.vmap`` fuses a batch of pairs (parents stacked
leaf-wise on a leading axis). ``fuse_sharded`` splits that leading axis over a
1-D device mesh with ``jax.shard_map``: every device runs the vmapped fusion
on its own block of pairs, with no communication between devices (the pairs
are independent), and the outputs stay sharded along the same axis.

>>> mesh = make_pair_mesh()                       # all devices, axis "pairs"
>>> fused, aux = fuse_sharded([stack_a, stack_b], spec, otf.FusionConfig(), mesh=mesh)
>>> fused["params"]["fc1"]["kernel"].sharding     # NamedSharding(mesh, P("pairs"))

A batch whose size is not a multiple of the device count is padded (by
repeating its last pair) and the padding is dropped from the outputs. An
array cannot be split evenly into D shards along an axis of a size that D
does not divide, so those trimmed outputs come back replicated (gathered on
every device); ``trim=False`` keeps the padded outputs sharded instead.

Testing on one CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set before JAX is imported) gives 8 host devices.

Multi-host use: start every process with ``jax.distributed.initialize()``
(coordinator address, process count and id, or auto-detected on Cloud TPU /
SLURM) before any other JAX call. ``jax.devices()`` then lists the devices of
all hosts and ``make_pair_mesh()`` spans them. Each process holds only its
own pairs, so build the global inputs with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P(PAIR_AXIS)), local)``
for every leaf (each process passes its slice, equal sizes, the global batch a
multiple of the global device count so no padding is needed) and call
``fuse_sharded`` with the same arguments in every process. The outputs are
global arrays; ``addressable_shards`` gives each process its own pairs, and
``jax.experimental.multihost_utils.process_allgather`` collects everything on
every host if needed. The exact ``"host"`` backend runs its callbacks on each
process's own CPU, for that process's pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from otfusion_jax import engine
from otfusion_jax import spec as spec_lib

__all__ = ["PAIR_AXIS", "make_pair_mesh", "pair_sharding", "fuse_sharded"]

PAIR_AXIS = "pairs"


def make_pair_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the batch-of-pairs axis.

    Args:
      devices: the devices to use, in order; None uses ``jax.devices()`` (all
        devices of all processes after ``jax.distributed.initialize``).

    Returns:
      A ``Mesh`` with one axis named ``PAIR_AXIS`` ("pairs").
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_pair_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (PAIR_AXIS,))


def pair_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of an array whose leading axis is the batch of pairs, split over ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(PAIR_AXIS))


def _batch_size(tree: Any) -> int:
    """The common leading size of every leaf of ``tree``; raises FusionError if they differ."""
    sizes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = jnp.shape(leaf)
        if not shape:
            raise engine.FusionError(f"leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a pair axis")
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if not sizes:
        raise engine.FusionError("fuse_sharded got no arrays")
    if len(sizes) > 1:
        detail = ", ".join(f"{n} at {p}" for n, p in sizes.items())
        raise engine.FusionError(f"leaves disagree on the number of pairs (leading axis): {detail}")
    return next(iter(sizes))


@functools.partial(jax.jit, static_argnums=(1,))
def _pad(tree: Any, extra: int) -> Any:
    """Appends ``extra`` copies of the last entry along every leaf's leading axis."""
    return jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0), tree
    )


@functools.partial(jax.jit, static_argnums=(1,))
def _trim(tree: Any, size: int) -> Any:
    """Keeps the first ``size`` entries along every leaf's leading axis."""
    return jax.tree_util.tree_map(lambda x: x[:size], tree)


@functools.lru_cache(maxsize=64)
def _sharded_fuse_fn(spec: spec_lib.AlignmentSpec, aligner: Any, mesh: Mesh, target: int):
    """jit(shard_map(vmap(fuse))) for one (spec, aligner, mesh, target); cached so it is traced once per shapes."""

    def local(parents, activations, weights, keys):
        def one(ps, acts, w, key):
            return engine.fuse(ps, spec, aligner, activations=acts, weights=w, target=target, key=key)

        return jax.vmap(one)(parents, activations, weights, keys)

    spec_p = PartitionSpec(PAIR_AXIS)
    # No collectives: the per-device blocks are independent, so replication checks are moot.
    if hasattr(jax, "shard_map"):
        mapped = jax.shard_map(local, mesh=mesh, in_specs=spec_p, out_specs=spec_p, check_vma=False)
    else:  # JAX < 0.7
        from jax.experimental.shard_map import shard_map  # pylint: disable=import-outside-toplevel

        mapped = shard_map(local, mesh=mesh, in_specs=spec_p, out_specs=spec_p, check_rep=False)
    return jax.jit(mapped)


def fuse_sharded(
    parents_stacked: Sequence[Mapping[str, Any]],
    spec: spec_lib.AlignmentSpec,
    aligner: Any = None,
    *,
    mesh: Mesh | None = None,
    activations: Sequence[Mapping[str, Sequence[jax.Array]]] | None = None,
    weights: jax.Array | None = None,
    target: int = -1,
    keys: jax.Array | None = None,
    trim: bool = True,
) -> tuple[dict[str, Any], engine.FusionAux]:
    """Fuses a batch of B independent K-parent fusions, the batch split across devices.

    Equivalent to ``jax.vmap(lambda *ps: fuse(ps, spec, aligner))`` over the
    leading axis, but each device of ``mesh`` fuses only its block of
    ``ceil(B / D)`` pairs (D devices). Inputs are not checked for NaN/Inf
    (that would copy everything to the host; call ``otf.check_finite`` on
    one slice if needed).

    Args:
      parents_stacked: K Flax variable dicts; every leaf has a leading batch
        axis of size B (fusion b uses entry b of every parent).
      spec: the models' alignment spec.
      aligner: the method, as for ``otf.fuse`` (default ``FusionConfig()``).
      mesh: a 1-D mesh with axis ``PAIR_AXIS`` (``make_pair_mesh()``); None
        uses all devices.
      activations: activation mode: per parent, plan name -> tuple of
        (B, S, ..., n) arrays.
      weights: optional (B, K) averaging weights, one row per fusion.
      target: index of the target parent (as for ``otf.fuse``).
      keys: optional (B,) PRNG keys of seeded aligners, one per fusion.
      trim: drop the padding from the outputs (B not a multiple of D). The
        trimmed arrays cannot be split evenly over D devices, so they come
        back replicated; False returns the padded batch (ceil(B / D) * D
        entries, the first B valid) sharded over the mesh.

    Returns:
      (fused, aux) as ``fuse`` returns them, with a leading axis of size B on
      every array (padded size if ``trim`` is False), sharded over the mesh
      along that axis (replicated after trimming, see ``trim``).

    Raises:
      FusionError: leaves disagree on B, or ``fuse`` rejects the parents.
    """
    mesh = make_pair_mesh() if mesh is None else mesh
    if mesh.axis_names != (PAIR_AXIS,):
        raise ValueError(f"mesh must be 1-D with axis {PAIR_AXIS!r} (make_pair_mesh), got axes {mesh.axis_names}")
    parents = [dict(p) for p in parents_stacked]
    acts = None if activations is None else [dict(a) for a in activations]
    if aligner is None:
        from otfusion_jax.fusion import FusionConfig  # pylint: disable=import-outside-toplevel

        aligner = FusionConfig()
    tree = (parents, acts, weights, keys)
    batch = _batch_size(tree)
    n_dev = mesh.devices.size
    padded = math.ceil(batch / n_dev) * n_dev
    if padded != batch:
        tree = _pad(tree, padded - batch)
    tree = jax.device_put(tree, pair_sharding(mesh))
    out = _sharded_fuse_fn(spec, aligner, mesh, target)(*tree)
    if trim and padded != batch:
        out = _trim(out, batch)
    return out
