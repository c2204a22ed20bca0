"""Fashion-MNIST padded to 32x32, VGG11 with BatchNorm (bias-free), sized for a CPU.

``configs/fashion_vgg11.py`` with a BatchNorm after every conv (the parents of
``checkpoints/fashion_vgg11_bn``: ``python train.py --config=configs/fashion_vgg11_bn.py``); same widths,
data (55,000 training images, 5,000 held out), recipe and fusion methods. After fusion the
BatchNorm statistics are aligned with the plans (``experiment.bn_stats="align"``), recomputed on
training samples (``"recompute"``) or REPAIRed (``experiment.repair``): docs/scripts/conv_fusion.sh
compares the three.
"""

import ml_collections

from configs import fashion_vgg11


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / VGG11-BN config."""
    config = fashion_vgg11.get_config()
    config.workdir = "runs/fashion_vgg11_bn"  # results
    config.parents_dir = "checkpoints/fashion_vgg11_bn"  # the ready-made parents
    config.model.norm = True  # BatchNorm after each conv (no conv biases: BatchNorm's shift replaces them)
    return config
