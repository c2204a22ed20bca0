"""Beyond the original on the ready-made Fashion-MNIST MLPNet pair: every one-shot method, with and without REPAIR.

  python fuse.py --config=configs/fashion_mlpnet_beyond.py
"""

import ml_collections

from configs import fashion_mlpnet


def get_config() -> ml_collections.ConfigDict:
    """Returns the one-shot comparison config (docs/RESULTS.md, 'Beyond the original')."""
    config = fashion_mlpnet.get_config()
    config.workdir = "runs/fashion_mlpnet_beyond"  # results
    config.experiment.method = "ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,wm,wm-refine,wm-soft,learned"  # every one-shot method
    config.fusion.epsilon = 0.05  # Sinkhorn, relative to the mean cost
    config.fusion.relative_epsilon = "mean"  # scale-free epsilon
    config.experiment.repair = True  # "+ REPAIR" rows (bias-free MLPNet: zero biases are added first)
    config.experiment.num_samples = 512  # activation and REPAIR samples
    config.experiment.learn_steps = 100  # learned fusion: Adam steps
    return config
