"""Fashion-MNIST padded to 32x32, ResNet18 without biases or BatchNorm (the original's ``resnet18_nobias_nobn``), sized for a CPU.

The parents of ``checkpoints/fashion_resnet18`` (``python train.py --config=configs/fashion_resnet18.py``
rebuilds them): an eighth of ResNet18's widths (8..64 channels), 8 epochs of SGD (lr 0.05,
momentum 0.9, weight decay 1e-4, batch 128, cosine schedule); about 137 s an epoch on 2 CPU
cores (``bench/train_throughput.py``). The first 55,000 training images train the parents; the
last 5,000 are held out. Fusion: the published ResNet18 command (activations of 200 training
samples, exact OT, residual streams sharing one plan).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / ResNet18 config."""
    config = default_lib.get_config()
    config.workdir = "runs/fashion_resnet18"  # results
    config.parents_dir = "checkpoints/fashion_resnet18"  # the ready-made parents
    config.model.name = "resnet18"  # CIFAR-style ResNet18
    config.model.bias = False  # no biases, as in the paper
    config.model.norm = False  # no BatchNorm, as in the paper
    config.model.width = 0.125  # 8..64 channels: 8 epochs in about 20 minutes on 2 CPU cores
    config.data.name = "fashion_mnist"  # 60k train / 10k test
    config.data.source = "idx"  # IDX files on disk
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder
    config.data.pad_to = 32  # 28 -> 32
    config.data.max_train = 55000  # the last 5,000 training images are held out from training
    config.train.epochs = 8  # a short run with a cosine schedule
    config.train.batch_size = 128
    config.train.lr = 0.05  # half the paper's 0.1: no BatchNorm, and a short run
    config.train.momentum = 0.9  # the paper's momentum
    config.train.weight_decay = 1e-4  # the paper's weight decay
    config.train.schedule = "cosine"  # to zero over the 8 epochs
    config.experiment.method = "ot-acts,ot-weights,wm"  # the published command first
    config.experiment.num_samples = 200  # the paper's 200 samples
    return config
