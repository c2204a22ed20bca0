"""The native exact assignment: a C++ solver (``lap.cc``) called from jitted code as an XLA FFI target.

``exact_backend="native"``, what "auto" picks on a CPU backend when it can be built. Unlike the host solvers
(scipy, lapjv), which reach XLA through ``jax.pure_callback``, a program that calls an FFI target can be
loaded from JAX's persistent compilation cache by a new process: a second ``fuse.py`` run on the same shapes
compiles nothing. The solve also skips the Python round trip.

The library is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``) against the XLA
FFI headers that ship with jaxlib, into ``$OTFUSION_JAX_NATIVE`` (default
``$XDG_CACHE_HOME/otfusion-jax/native``, ``~/.cache`` when unset), one file per (source, jaxlib, compiler),
written to a temporary name and renamed, so concurrent processes never load a half-written library.
Building takes a few seconds once per machine (and is done again if the cached file cannot be loaded). Without a compiler (or with ``OTFUSION_JAX_NATIVE=off``)
:func:`available` is False, "auto" falls back to the host solvers, and asking for "native" is an error that
says why.

CPU only: on a GPU or TPU backend "auto" picks the on-device auction.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

__all__ = ["available", "build_error", "library_path", "assign"]

NATIVE_ENV = "OTFUSION_JAX_NATIVE"
_OFF = ("0", "off", "none", "false", "no")
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lap.cc")
_TARGETS = {jnp.dtype(jnp.float32): "otfusion_lap_f32", jnp.dtype(jnp.float64): "otfusion_lap_f64"}
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_SYMBOLS = {"otfusion_lap_f32": "OtfusionLapF32", "otfusion_lap_f64": "OtfusionLapF64"}


class NativeBuildError(RuntimeError):
    """The native solver could not be built or loaded; the message says why."""


def _cache_root() -> str | None:
    value = os.environ.get(NATIVE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF or not value.strip() else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "otfusion-jax", "native")


BUILD_TIMEOUT_S = 300


def _compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` (may carry arguments, e.g. "ccache g++") as given, else c++, g++, clang++."""
    if os.environ.get("CXX", "").strip():
        cmd = shlex.split(os.environ["CXX"])
        return cmd if shutil.which(cmd[0]) else None
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def library_path() -> str:
    """Where the built library lives (or will): keyed by the source, jaxlib's version and the compiler."""
    root = _cache_root()
    if root is None:
        raise NativeBuildError(f"the native solver is turned off (${NATIVE_ENV}={os.environ.get(NATIVE_ENV)!r})")
    import jaxlib  # pylint: disable=import-outside-toplevel

    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(jaxlib.__version__.encode())
    key.update(" ".join((str(_compiler()), *_FLAGS)).encode())
    key.update(f"{sys.platform} {platform.machine()}".encode())
    return os.path.join(root, f"otfusion_lap-{key.hexdigest()[:16]}.so")


def _build(path: str) -> None:
    cxx = _compiler()
    if cxx is None:
        if os.environ.get("CXX", "").strip():
            raise NativeBuildError(f"$CXX={os.environ['CXX']!r} is not an executable on PATH")
        raise NativeBuildError("no C++ compiler found ($CXX, c++, g++, clang++): install one (e.g. apt-get install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [*cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise NativeBuildError(f"{' '.join(cmd)} took more than {BUILD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp made it owner-only: a shared cache folder must be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def _load() -> str | NativeBuildError:
    """Builds (once per machine) and registers the FFI targets; returns the library path or the error."""
    try:
        path = library_path()
        if not os.path.exists(path):
            _build(path)
        try:
            lib = ctypes.cdll.LoadLibrary(path)
        except OSError:  # a bad file in the cache (truncated by a crash, another machine's): build it again, once
            _build(path)
            lib = ctypes.cdll.LoadLibrary(path)
        for target, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return path
    except Exception as e:  # pylint: disable=broad-except  # a probe: any failure means "not available", with why
        return e if isinstance(e, NativeBuildError) else NativeBuildError(f"{type(e).__name__}: {e}")


def available() -> bool:
    """Whether the native solver is built (building it now if needed) and registered."""
    return isinstance(_load(), str)


def build_error() -> str | None:
    """Why the native solver is not available (None when it is)."""
    loaded = _load()
    return None if isinstance(loaded, str) else str(loaded)


def assign(cost: jax.Array) -> jax.Array:
    """``perm`` of shape ``cost.shape[:-1]`` (int32): ``perm[..., j]`` = the row assigned to column j.

    Exact minimum-cost assignment of a square cost (float32 or float64; other float types are solved in
    float32; any leading batch axes); works
    under ``jit`` and ``vmap`` (the batch is solved in one call, problem after problem). Not differentiable:
    the cost is read through ``stop_gradient``. A non-finite cost entry fails the call with an error naming
    the entry.

    Raises:
      NativeBuildError: the solver could not be built (the message says why).
      ValueError: the cost is not square or not float32/float64.
    """
    loaded = _load()
    if not isinstance(loaded, str):
        raise loaded
    if cost.ndim < 2 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"native assignment needs a square cost in its last two axes, got shape {cost.shape}")
    if jnp.issubdtype(cost.dtype, jnp.floating) and jnp.dtype(cost.dtype) not in _TARGETS:
        cost = cost.astype(jnp.float32)  # float16 / bfloat16: solved in float32
    target = _TARGETS.get(jnp.dtype(cost.dtype))
    if target is None:
        raise ValueError(f"native assignment takes floating-point costs, got {cost.dtype}")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32), vmap_method="broadcast_all")
    return call(jax.lax.stop_gradient(cost))
