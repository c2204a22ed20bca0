"""MLPNet: the fully connected network of the OTFusion paper (784-400-200-100-10), described once.

``RECORD`` holds the options (:class:`MLPNetOptions`), the module, the spec and
the layout of the original's ``model.py`` MlpNet (``fc{i}.weight`` (out, in) ->
``params/fc{i}/kernel`` (in, out); the original flattens NCHW images as (C, H,
W), ours NHWC images as (H, W, C): identical for 1-channel images).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models import torch_layout as tl
from otfusion_jax.models.common import sow_acts
from otfusion_jax.models.record import ModelRecord

__all__ = ["MLPNet", "MLPNetOptions", "mlpnet_spec", "RECORD"]


@dataclasses.dataclass(frozen=True)
class MLPNetOptions:
    """Options of ``models.build("mlpnet", ...)`` and ``config.model``.

    Attributes:
      bias: biases in every layer (the paper's model has none).
      widths: hidden layer widths.
    """

    bias: bool = False
    widths: tuple[int, ...] = (400, 200, 100)

    def __post_init__(self):
        if any(w < 1 for w in self.widths):
            raise ValueError(f"mlpnet widths must be >= 1, got {self.widths}")


class MLPNet(nn.Module):
    """ReLU MLP over flattened inputs. Layers are named fc1..fc{L+1} like the original.

    Sows each hidden layer's pre- and post-ReLU activations (and the logits) into
    the "acts_pre" / "acts_post" collections under the name of the plan they feed.
    """

    widths: tuple[int, ...] = (400, 200, 100)
    num_classes: int = 10
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: x: (N, H, W, C) images. Returns: (N, num_classes) logits."""
        del train  # no dropout or norm
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            name = f"fc{i + 1}"
            x = nn.Dense(width, use_bias=self.use_bias, name=name)(x)
            y = nn.relu(x)
            sow_acts(self, name, x, y)
            x = y
        name = f"fc{len(self.widths) + 1}"
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name=name)(x)
        sow_acts(self, name, x)
        return x


def mlpnet_spec(num_layers: int, *, bias: bool) -> spec_lib.AlignmentSpec:
    """Spec of an MLPNet with ``num_layers`` hidden layers: plan ``fc{i}`` on layer i's outputs."""
    names = [f"fc{i + 1}" for i in range(num_layers + 1)]
    leaves: dict[str, spec_lib.LeafSpec] = {}
    prev = None
    for name in names:
        leaves.update(spec_lib.dense(name, prev, name, bias=bias))
        prev = name
    return spec_lib.AlignmentSpec.build(leaves, names, output_plan=names[-1])


# ----------------------------------------------------------------------------- the original's layout

_FC_KEY = re.compile(r"fc([1-9]\d*)\.(?:weight|bias)")
_FC_PATH = re.compile(r"params/fc([1-9]\d*)/(?:kernel|bias)")


def _torch_entries(o: MLPNetOptions, input_shape: tuple[int, int, int], num_classes: int) -> list[tl.TorchEntry]:
    h, w, c = input_shape
    out: list[tl.TorchEntry] = []
    n_in = h * w * c
    for i, n_out in enumerate([*o.widths, num_classes]):
        out += tl.dense_entries(f"fc{i + 1}", f"fc{i + 1}", n_in, n_out, o.bias, hw=(h, w) if i == 0 else None)
        n_in = n_out
    return out


def _torch_detect(keys: frozenset[str]) -> bool:
    return bool(keys) and all(_FC_KEY.fullmatch(k) for k in keys)


def _torch_infer(shapes: Mapping[str, tuple[int, ...]], input_shape):
    found = [_FC_KEY.fullmatch(k) for k in shapes]
    n = max([int(m.group(1)) for m in found if m] or [1])
    fc = [tl.require(shapes, f"fc{i}.weight", 2, "mlpnet") for i in range(1, n + 1)]
    options = MLPNetOptions(bias="fc1.bias" in shapes, widths=tuple(s[0] for s in fc[:-1]))
    n_in, classes = fc[0][1], fc[-1][0]
    if input_shape is None:
        input_shape = {784: (28, 28, 1), 3072: (32, 32, 3)}.get(n_in, (1, 1, n_in))
    elif math.prod(input_shape) != n_in:
        raise tl.LayoutError(
            f"key 'fc1.weight' reads {n_in} inputs but input_shape {tuple(input_shape)} has {math.prod(input_shape)}"
        )
    return options, tuple(input_shape), classes


def _torch_reads(paths: Collection[str]):
    found = [_FC_PATH.fullmatch(p) for p in paths]
    n = max([int(m.group(1)) for m in found if m] or [1])
    reads = [(f"params/fc{i}/kernel", f"fc{i}.weight", True) for i in range(1, n + 1)]
    return [*reads, ("params/fc1/bias", "fc1.bias", False)]


def _scale_width(o: MLPNetOptions, factor: float) -> MLPNetOptions:
    return dataclasses.replace(o, widths=tuple(max(1, int(round(w * factor))) for w in o.widths))


RECORD = ModelRecord(
    name="mlpnet",
    options=MLPNetOptions,
    module=lambda o, input_shape, num_classes: MLPNet(widths=o.widths, num_classes=num_classes, use_bias=o.bias),
    spec=lambda o, input_shape: mlpnet_spec(len(o.widths), bias=o.bias),
    has_bias=lambda o: o.bias,
    scale_width=_scale_width,
    torch=tl.TorchLayout(detect=_torch_detect, entries=_torch_entries, infer=_torch_infer, reads=_torch_reads),
    example_input_shape=(8, 8, 1),
    examples=(MLPNetOptions(), MLPNetOptions(bias=True, widths=(5, 3))),
)
