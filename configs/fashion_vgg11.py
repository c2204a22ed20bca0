"""Fashion-MNIST padded to 32x32, VGG11 without biases or BatchNorm (the original's ``vgg11_nobias``), sized for a CPU.

The parents of ``checkpoints/fashion_vgg11`` (``python train.py --config=configs/fashion_vgg11.py``
rebuilds them): a quarter of VGG11's widths (16..128 channels), 8 epochs of the paper's VGG11
recipe (SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128) with a cosine schedule; about
106 s an epoch on 2 CPU cores (``bench/train_throughput.py``). The first 55,000 training images
train the parents; the last 5,000 are held out from training, for choices made on data the
parents have not seen (never the test set). Fusion: the published VGG11 command (weights mode,
exact OT, correction, past correction, Euclidean not squared: the defaults).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / VGG11 config."""
    config = default_lib.get_config()
    config.workdir = "runs/fashion_vgg11"  # results
    config.parents_dir = "checkpoints/fashion_vgg11"  # the ready-made parents
    config.model.name = "vgg11"  # 8 convs + 1 dense
    config.model.bias = False  # no biases, as in the paper
    config.model.norm = False  # no BatchNorm, as in the paper
    config.model.width = 0.25  # 16..128 channels: 8 epochs in about 15 minutes on 2 CPU cores
    config.data.name = "fashion_mnist"  # 60k train / 10k test
    config.data.source = "idx"  # IDX files on disk
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder
    config.data.pad_to = 32  # 28 -> 32: VGG11 has 5 max pools
    config.data.max_train = 55000  # the last 5,000 training images are held out from training
    config.train.epochs = 8  # a short run with a cosine schedule
    config.train.batch_size = 128  # as the paper's VGG11 recipe
    config.train.lr = 0.05  # as the paper's VGG11 recipe
    config.train.momentum = 0.9  # as the paper's VGG11 recipe
    config.train.weight_decay = 5e-4  # as the paper's VGG11 recipe
    config.train.schedule = "cosine"  # to zero over the 8 epochs
    config.experiment.method = "ot-weights,ot-acts,wm"  # the published command, then activations and weight matching
    return config
