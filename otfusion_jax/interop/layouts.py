"""Array layout conversions between Flax (ours) and PyTorch (the original OTFusion).

Flax: dense kernel (in, out), conv kernel HWIO, NHWC maps flattened row-major
as (H, W, C). PyTorch: dense weight (out, in), conv weight OIHW, NCHW maps
flattened as (C, H, W). Each pair below is an exact inverse (pure transposes).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "dense_to_torch",
    "dense_from_torch",
    "conv_to_torch",
    "conv_from_torch",
    "flatten_dense_to_torch",
    "flatten_dense_from_torch",
    "acts_to_torch",
    "acts_from_torch",
]


def dense_to_torch(kernel: np.ndarray) -> np.ndarray:
    """(in, out) -> (out, in)."""
    return np.asarray(kernel).T


def dense_from_torch(weight: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out)."""
    return np.asarray(weight).T


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return np.transpose(np.asarray(kernel), (3, 2, 0, 1))


def conv_from_torch(weight: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO."""
    return np.transpose(np.asarray(weight), (2, 3, 1, 0))


def flatten_dense_to_torch(kernel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Dense kernel after an NHWC flatten (H*W*C, out) -> torch weight after an NCHW flatten (out, C*H*W)."""
    h, w = hw
    k = np.asarray(kernel)
    c = k.shape[0] // (h * w)
    return k.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], c * h * w)


def flatten_dense_from_torch(weight: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Torch (out, C*H*W) -> Flax (H*W*C, out)."""
    h, w = hw
    wt = np.asarray(weight)
    c = wt.shape[1] // (h * w)
    return wt.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, wt.shape[0])


def acts_to_torch(acts: np.ndarray) -> np.ndarray:
    """(S, H, W, C) -> (S, C, H, W); (S, n) unchanged."""
    a = np.asarray(acts)
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def acts_from_torch(acts: np.ndarray) -> np.ndarray:
    """(S, C, H, W) -> (S, H, W, C) (e.g. NCHW images to NHWC); (S, n) unchanged."""
    a = np.asarray(acts)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a
