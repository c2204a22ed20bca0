"""Fashion-MNIST padded to 32x32, VGG11 without biases (meant for a GPU).

The CIFAR-10 VGG11 recipe of the paper (SGD lr 0.05, momentum 0.9, weight
decay 5e-4, batch 128, lr halved on a fixed period) on a shorter run.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / VGG11 config."""
    config = default_lib.get_config()
    config.workdir = "runs/fashion_vgg11"  # parents and results
    config.model.name = "vgg11"  # 8 convs + 1 dense
    config.model.bias = False  # no biases, as in the paper
    config.model.norm = False  # no BatchNorm, as in the paper
    config.model.width = 1.0  # full VGG11 widths (64..512)
    config.data.name = "fashion_mnist"  # 60k train / 10k test
    config.data.source = "idx"  # IDX files on disk
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder
    config.data.pad_to = 32  # 28 -> 32: VGG11 has 5 max pools
    config.train.epochs = 30  # shorter than CIFAR-10's 300
    config.train.batch_size = 128  # as the paper's VGG11 recipe
    config.train.lr = 0.05  # as the paper's VGG11 recipe
    config.train.momentum = 0.9  # as the paper's VGG11 recipe
    config.train.weight_decay = 5e-4  # as the paper's VGG11 recipe
    config.train.schedule = "step"  # halve the lr periodically
    config.train.step_every = 10  # every 10 epochs
    config.train.gamma = 0.5  # halved
    return config
