"""otfusion_jax: model fusion via optimal transport (OTFusion) in JAX/Flax with OTT-JAX.

>>> import otfusion_jax as otf
>>> model, spec = otf.models.build("mlpnet", bias=False)
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights", solver="exact"))
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.WeightMatching(), key=0)
"""

from otfusion_jax import (
    cca,
    checkpoints,
    configs_util,
    data,
    engine,
    io_utils,
    matching,
    models,
    ot,
    plans,
    refit,
    repair,
    sharding,
    spec,
    training,
)
from otfusion_jax.cca import CCAMerge
from otfusion_jax.engine import (
    Aligner,
    Alignment,
    FusionAux,
    FusionError,
    align_parents,
    averaging_weights,
    check_finite,
    check_parents,
    ensemble_weights,
    fuse,
    vanilla_average,
    warn_unconverged,
)
from otfusion_jax.fusion import FusionConfig, OTFusion
from otfusion_jax.matching import MatchingInfo, Refine, WeightMatching, matching_objective, weight_matching
from otfusion_jax.plans import Linear, Permutation, apply_plans, perms_to_plans, plans_to_perms
from otfusion_jax.sharding import fuse_sharded, make_pair_mesh
from otfusion_jax.spec import AlignmentSpec, LeafSpec, SpecError

__all__ = [
    # subpackages
    "cca",
    "checkpoints",
    "configs_util",
    "data",
    "engine",
    "io_utils",
    "matching",
    "models",
    "ot",
    "plans",
    "refit",
    "repair",
    "sharding",
    "spec",
    "training",
    # one entry point per task
    "fuse",
    "align_parents",
    "fuse_sharded",
    "weight_matching",
    # aligners
    "Aligner",
    "FusionConfig",
    "OTFusion",
    "WeightMatching",
    "Refine",
    "CCAMerge",
    # data types
    "Alignment",
    "AlignmentSpec",
    "FusionAux",
    "FusionError",
    "LeafSpec",
    "Linear",
    "MatchingInfo",
    "Permutation",
    "SpecError",
    # helpers
    "apply_plans",
    "averaging_weights",
    "check_finite",
    "check_parents",
    "ensemble_weights",
    "make_pair_mesh",
    "matching_objective",
    "perms_to_plans",
    "plans_to_perms",
    "vanilla_average",
    "warn_unconverged",
]
__version__ = "0.1.0"
