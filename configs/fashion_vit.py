"""Fashion-MNIST, a small Vision Transformer sized for a CPU (issue 12).

The parents of ``checkpoints/fashion_vit`` (``python train.py --config=configs/fashion_vit.py`` rebuilds
them): 4 pre-LN blocks, embedding width 64, 4 heads of 16, MLP 128, 7x7 patches (16 patches + a class
token), about 0.2M parameters; 20 epochs of AdamW (lr 1e-3, weight decay 0.05, batch 128) with a
2-epoch linear warm-up and a cosine decay: about 17 s an epoch on 2 CPU cores (3,200 images/s), so
about 6 minutes a parent. The first 55,000 training images train the parents; the last 5,000 are
held out from training, for choices made on data the parents have not seen (never the test set).
Fusion: OTFusion by weights and by activations and weight matching, every one with head-structured
plans on the attention and a permutation of the LayerNorm'd residual stream.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / ViT config."""
    config = default_lib.get_config()
    config.workdir = "runs/fashion_vit"  # results
    config.parents_dir = "checkpoints/fashion_vit"  # the ready-made parents
    config.model.name = "vit"  # pre-LN ViT, class token, learned positions
    config.model.bias = True  # biases everywhere, as timm's ViTs
    config.model.depth = 4  # transformer blocks
    config.model.embed_dim = 64  # residual stream width
    config.model.num_heads = 4  # heads of 16
    config.model.mlp_dim = 128  # MLP ratio 2
    config.model.patch_size = 7  # 28x28 -> 4x4 patches: 17 tokens
    config.data.name = "fashion_mnist"  # 60k train / 10k test
    config.data.source = "idx"  # IDX files on disk
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"  # the Debian package's folder
    config.data.max_train = 55000  # the last 5,000 training images are held out from training
    config.train.epochs = 20  # about 6 minutes a parent on 2 CPU cores
    config.train.batch_size = 128  # examples per step
    config.train.optimizer = "adamw"  # the transformers' optimiser
    config.train.lr = 1e-3  # peak learning rate
    config.train.weight_decay = 0.05  # decoupled
    config.train.warmup_epochs = 2.0  # linear warm-up, then
    config.train.schedule = "cosine"  # cosine decay to zero
    config.experiment.method = "ot-weights,ot-acts,wm"  # OTFusion by weights, by activations, weight matching
    return config
