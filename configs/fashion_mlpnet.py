"""Fashion-MNIST from the system IDX files, MLPNet 784-400-200-100-10 without biases.

Reads /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``)
with the MNIST recipe of the paper (10 epochs, SGD lr 0.01, momentum 0.5, batch 64).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / MLPNet config."""
    config = default_lib.get_config()
    config.workdir = "runs/fashion_mlpnet"  # results
    config.parents_dir = "checkpoints/fashion_mlpnet"  # the two ready-made parents (python train.py --config=... rebuilds them)
    config.model.name = "mlpnet"  # fully connected net
    config.model.bias = False  # no biases
    config.model.widths = (400, 200, 100)  # the paper's MNIST widths
    config.data.name = "fashion_mnist"  # 60k train / 10k test, 28x28
    config.data.source = "idx"  # IDX files on disk
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder
    config.train.epochs = 10  # as the paper's MNIST recipe
    config.train.batch_size = 64  # as the paper's MNIST recipe
    config.train.lr = 0.01  # as the paper's MNIST recipe
    config.train.momentum = 0.5  # as the paper's MNIST recipe
    config.train.schedule = "constant"  # no decay
    return config
