"""otfusion_jax: model fusion via optimal transport in JAX/Flax."""

from otfusion_jax import models, spec

__all__ = ["models", "spec"]
__version__ = "0.1.0"
