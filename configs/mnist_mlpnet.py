"""The paper's MNIST recipe: MLPNet 784-400-200-100-10 without biases, 2 parents.

10 epochs of SGD, lr 0.01, momentum 0.5, batch 64 (parents near 97.7%).
Data from TFDS by default; for an offline folder of IDX files use
``--config.data.source=idx --config.data.data_dir=/path/to/mnist``.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the MNIST / MLPNet config (the paper's setting)."""
    config = default_lib.get_config()
    config.workdir = "runs/mnist_mlpnet"  # parents and results
    config.model.name = "mlpnet"  # fully connected net
    config.model.bias = False  # no biases, as in the paper
    config.model.widths = (400, 200, 100)  # the paper's widths
    config.data.name = "mnist"  # MNIST, 60k train / 10k test
    config.data.source = "auto"  # tfds, or idx when data_dir is set
    config.train.epochs = 10  # the paper's 10 epochs
    config.train.batch_size = 64  # the paper's batch size
    config.train.lr = 0.01  # the paper's learning rate
    config.train.momentum = 0.5  # the paper's momentum
    config.train.schedule = "constant"  # no decay
    return config
