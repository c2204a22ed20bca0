"""otfusion_jax: model fusion via optimal transport (OTFusion) in JAX/Flax with OTT-JAX.

>>> import otfusion_jax as otf
>>> model, spec = otf.models.build("mlpnet", bias=False)
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights", solver="exact"))
"""

from otfusion_jax import checkpoints, configs_util, data, io_utils, models, ot, spec, training
from otfusion_jax.fusion import (
    FusionAux,
    FusionConfig,
    FusionError,
    align,
    apply_plans,
    check_finite,
    check_parents,
    fuse,
    vanilla_average,
    warn_unconverged,
)
from otfusion_jax.spec import AlignmentSpec, LeafSpec, SpecError

__all__ = [
    "checkpoints",
    "configs_util",
    "data",
    "io_utils",
    "training",
    "models",
    "ot",
    "spec",
    "AlignmentSpec",
    "LeafSpec",
    "SpecError",
    "FusionAux",
    "FusionConfig",
    "FusionError",
    "align",
    "apply_plans",
    "check_finite",
    "check_parents",
    "fuse",
    "vanilla_average",
    "warn_unconverged",
]
__version__ = "0.1.0"
