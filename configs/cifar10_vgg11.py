"""The paper's CIFAR-10 VGG11 recipe (no biases, no BatchNorm), from TFDS.

SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128, 300 epochs, lr halved
every 30 epochs (parents near 90.3-90.5%).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the CIFAR-10 / VGG11 config (the paper's setting)."""
    config = default_lib.get_config()
    config.workdir = "runs/cifar10_vgg11"  # parents and results
    config.model.name = "vgg11"  # 8 convs + 1 dense
    config.model.bias = False  # no biases, as in the paper
    config.model.norm = False  # no BatchNorm, as in the paper
    config.model.width = 1.0  # full VGG11 widths
    config.data.name = "cifar10"  # 50k train / 10k test, 32x32x3
    config.data.source = "tfds"  # TensorFlow Datasets
    config.train.epochs = 300  # the paper's 300 epochs
    config.train.batch_size = 128  # the paper's batch size
    config.train.lr = 0.05  # the paper's learning rate
    config.train.momentum = 0.9  # the paper's momentum
    config.train.weight_decay = 5e-4  # the paper's weight decay
    config.train.schedule = "step"  # periodic decay
    config.train.step_every = 30  # every 30 epochs
    config.train.gamma = 0.5  # halved
    config.train.eval_batch_size = 500  # 20 batches for the 10k test images
    return config
