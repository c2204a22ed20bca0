"""The paper's CIFAR-10 ResNet18 recipe (no biases, no BatchNorm), from TFDS.

SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, 300 epochs, lr divided
by 10 at epochs 150 and 250.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the CIFAR-10 / ResNet18 config (the paper's setting)."""
    config = default_lib.get_config()
    config.workdir = "runs/cifar10_resnet18"  # parents and results
    config.model.name = "resnet18"  # CIFAR-style ResNet18
    config.model.bias = False  # no biases, as in the paper
    config.model.norm = False  # no BatchNorm, as in the paper
    config.model.width = 1.0  # full widths (64..512)
    config.data.name = "cifar10"  # 50k train / 10k test, 32x32x3
    config.data.source = "tfds"  # TensorFlow Datasets
    config.train.epochs = 300  # the paper's 300 epochs
    config.train.batch_size = 256  # the paper's batch size
    config.train.lr = 0.1  # the paper's learning rate
    config.train.momentum = 0.9  # the paper's momentum
    config.train.weight_decay = 1e-4  # the paper's weight decay
    config.train.schedule = "multistep"  # decay at fixed epochs
    config.train.milestones = (150, 250)  # the paper's milestones
    config.train.gamma = 0.1  # divided by 10
    config.train.eval_batch_size = 500  # 20 batches for the 10k test images
    return config
