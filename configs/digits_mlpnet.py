"""Offline default: scikit-learn's 8x8 digits, MLPNet 128-64-32 without biases, 2 parents.

Trains each parent to about 97-99% test accuracy in about a second on 2 CPU cores.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits / MLPNet config."""
    config = default_lib.get_config()
    config.workdir = "runs/digits_mlpnet"  # results
    config.parents_dir = "checkpoints/digits_mlpnet"  # ready-made parents (python train.py rebuilds missing ones)
    config.model.widths = (128, 64, 32)  # hidden widths for 8x8 inputs
    config.train.epochs = 10  # ~1 s per parent on CPU
    config.train.batch_size = 32  # 47 steps per epoch on 1497 images
    config.train.lr = 0.02  # converges within a few epochs
    config.train.momentum = 0.9  # heavy-ball momentum
    return config
