"""otfusion_jax: model fusion via optimal transport (OTFusion) in JAX/Flax with OTT-JAX.

>>> import otfusion_jax as otf
>>> model, spec = otf.models.build("mlpnet", bias=False)
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights", solver="exact"))
"""

from otfusion_jax import (
    checkpoints,
    configs_util,
    data,
    io_utils,
    matching,
    models,
    ot,
    repair,
    sharding,
    spec,
    training,
)
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
from otfusion_jax.matching import (
    MatchingInfo,
    WeightMatchingAux,
    apply_perms,
    fuse_weight_matching,
    matching_objective,
    perms_to_plans,
    plans_to_perms,
    weight_matching,
)
from otfusion_jax.sharding import fuse_sharded, make_pair_mesh
from otfusion_jax.spec import AlignmentSpec, LeafSpec, SpecError

__all__ = [
    "checkpoints",
    "configs_util",
    "data",
    "io_utils",
    "training",
    "matching",
    "repair",
    "sharding",
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
    "MatchingInfo",
    "WeightMatchingAux",
    "apply_perms",
    "fuse_weight_matching",
    "matching_objective",
    "perms_to_plans",
    "plans_to_perms",
    "weight_matching",
    "fuse_sharded",
    "make_pair_mesh",
]
__version__ = "0.1.0"
