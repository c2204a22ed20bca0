"""Base config: every field, documented. Values are the offline default (digits, MLPNet).

Variants (``configs/<name>.py``) call ``default.get_config()`` and override
fields. The returned ConfigDict is locked: assigning a field that does not
exist (a typo) raises, on the command line too (``--config.train.epochz=3``).
Sections by concern: model, data, train (train.py); fusion (OTFusion's options,
the library's FusionConfig), matching (weight matching's), experiment (what
fuse.py makes: methods, tables, REPAIR, fine-tuning, plots). train.py and
fuse.py check every field before any work against its rule in
``otfusion_jax.configs_util.FIELDS`` (type, range or choices; one rule per field
below) and the combinations of fields; on the command line the text None sets
an optional text field back to None (``--config.parents_dir=None``).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the base config (sklearn digits, MLPNet 128-64-32, 2 parents)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parent k is initialised and shuffled with seed + k
    config.num_parents = 2  # K, number of parents trained (and fused)
    config.workdir = "runs/default"  # parents in <workdir>/parents/parent_<k>, results in <workdir>
    config.parents_dir = config_dict.placeholder(str)  # where parents are; None: <workdir>/parents
    config.parent_widths = ()  # width factor of parent k (missing entries: 1.0), for different-width fusion

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlpnet"  # registered model: mlpnet | vgg11 | resnet18 | vit
    config.model.bias = False  # biases in every layer (the paper's models have none)
    config.model.norm = False  # BatchNorm after each conv (vgg11, resnet18); must stay False for mlpnet
    config.model.width = 1.0  # channel multiplier (vgg11, resnet18); must stay 1.0 for mlpnet
    config.model.widths = (128, 64, 32)  # hidden layer widths (mlpnet); ignored by conv nets
    config.model.depth = 2  # transformer blocks (vit); ignored by the others
    config.model.embed_dim = 64  # embedding width, the residual stream (vit)
    config.model.num_heads = 4  # attention heads (vit)
    config.model.mlp_dim = 128  # MLP hidden width (vit)
    config.model.patch_size = 4  # patch size (vit)
    config.model.layer_norm_eps = 1e-6  # every LayerNorm's epsilon (vit; Hugging Face ViTs use 1e-12)

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # digits | mnist | fashion_mnist | cifar10
    config.data.source = "auto"  # auto | sklearn | idx | tfds (see otfusion_jax.data.load)
    config.data.data_dir = config_dict.placeholder(str)  # IDX folder or TFDS data dir; None: default
    config.data.pad_to = config_dict.placeholder(int)  # zero-pad images to pad_to x pad_to (vgg11: 32)
    config.data.max_train = config_dict.placeholder(int)  # keep the first max_train train examples
    config.data.max_test = config_dict.placeholder(int)  # keep the first max_test test examples
    config.data.seed = 0  # train/test split of digits, shared by all parents
    config.data.eval_split = "test"  # test | heldout (the training images after max_train: for choices, never the test set)

    config.train = ml_collections.ConfigDict()  # otfusion_jax.training.TrainConfig (seed: config.seed + k)
    config.train.epochs = 10  # passes over the training set
    config.train.batch_size = 32  # examples per SGD step
    config.train.lr = 0.02  # base learning rate
    config.train.momentum = 0.9  # heavy-ball momentum, no dampening (0: plain SGD)
    config.train.nesterov = False  # Nesterov momentum
    config.train.weight_decay = 0.0  # coupled L2, added to the gradient (PyTorch SGD weight_decay)
    config.train.schedule = "constant"  # constant | step | multistep | cosine
    config.train.step_every = 30  # "step": decay every step_every epochs
    config.train.gamma = 0.1  # "step" / "multistep": lr multiplier at each decay
    config.train.milestones = ()  # "multistep": epochs at which the lr decays
    config.train.label_smoothing = 0.0  # label smoothing of the training loss
    config.train.drop_remainder = False  # drop each epoch's last partial batch (torch drop_last)
    config.train.eval_batch_size = 1000  # batch size of the per-epoch test evaluation
    config.train.optimizer = "sgd"  # sgd (momentum, coupled L2) | adamw (decoupled weight decay)
    config.train.warmup_epochs = 0.0  # linear warm-up of the lr over this many epochs
    config.train.augment = "none"  # none | crop | flip_crop (random crops after padding by H/8, horizontal flips)

    config.fusion = ml_collections.ConfigDict()  # OTFusion: exactly otfusion_jax.FusionConfig's fields but mode (the method picks it)
    config.fusion.solver = "exact"  # exact | sinkhorn (a method may override it: ot-acts:sinkhorn)
    config.fusion.exact_backend = "auto"  # every exact assignment (weight matching too): auto (native C++ solver on CPU, else lapjv/host; auction on accelerators) | native | device (optax Hungarian) | auction | host (scipy callback) | lapjv
    config.fusion.auction_bidders = config_dict.placeholder(int)  # auction: rows bidding per round (None: 16 on CPU, all on accelerators)
    config.fusion.ground_metric = "euclidean"  # euclidean | cosine | correlation (1 - Pearson; not in the original)
    config.fusion.squared = False  # squared euclidean (published commands: not squared)
    config.fusion.normalize_cost = "none"  # none | log | max | median | mean
    config.fusion.unit_norm_rows = False  # weight mode: unit-norm neuron rows before the metric
    config.fusion.bias_in_cost = True  # weight mode: biases are an extra cost feature
    config.fusion.epsilon = 0.01  # Sinkhorn regularisation
    config.fusion.relative_epsilon = config_dict.placeholder(str)  # None (absolute) | mean | std
    config.fusion.sinkhorn_threshold = 1e-3  # Sinkhorn stopping threshold (marginal error)
    config.fusion.sinkhorn_max_iterations = 2000  # Sinkhorn iteration cap
    config.fusion.implicit_diff = False  # gradients: implicit (True) or unrolled (False)
    config.fusion.tau = 1.0  # unbalanced Sinkhorn marginal relaxation (1.0: balanced)
    config.fusion.correction = True  # each target neuron a barycentre of source neurons
    config.fusion.proper_marginals = False  # correction by the plan's actual column sums
    config.fusion.past_correction = True  # fuse input-aligned weights (published commands)
    config.fusion.importance = config_dict.placeholder(str)  # None | l1 | l2 marginals
    config.fusion.align_output = False  # True: give the class layer a plan too, as the original
    config.fusion.symmetry = "permutation"  # transformers: permutation | orthogonal (stream and heads rotated)
    config.fusion.stream_policy = "shared"  # transformers: shared (one stream plan) | mean (transformer-fusion's rule)

    config.matching = ml_collections.ConfigDict()  # weight matching (wm, wm-refine, wm-soft): otfusion_jax.WeightMatching
    config.matching.seed = 0  # its key: restart r sweeps the plans in the order of fold_in(key, r)
    config.matching.restarts = 8  # descents from as many sweep orders, solved together; the best objective wins
    config.matching.start = "identity"  # identity (Git Re-Basin's) | greedy (plan by plan from the producers)
    config.matching.max_sweeps = 20  # coordinate-descent sweeps over all plans, at most
    config.matching.tol = 1e-6  # a new permutation must raise its plan's term by more than tol x its size
    config.matching.epsilon = 0.1  # wm-soft: Sinkhorn regularisation (on the standardised similarity)
    config.matching.soft_tol = 1e-4  # wm-soft: a plan changes if an entry moves by more than this
    config.matching.sinkhorn_threshold = 1e-3  # wm-soft: Sinkhorn stopping threshold
    config.matching.sinkhorn_max_iterations = 2000  # wm-soft: Sinkhorn iteration cap
    config.matching.align_output = False  # also match the class layer's plan

    config.cca = ml_collections.ConfigDict()  # CCA Merge (method cca): otfusion_jax.CCAMerge
    config.cca.regularization = 0.5  # covariance shrinkage r in [0, 1]: (1 - r) S + r tr(S)/n I (held-out choice; 1: Procrustes, scaled)
    config.cca.acts_kind = "post"  # the activations it is solved from: after (post) or before (pre) the ReLU
    config.cca.num_samples = 1000  # training inputs they are captured on (None: experiment.num_samples); CCA needs more than 200

    config.refit = ml_collections.ConfigDict()  # least-squares refit ("+ refit" rows; otfusion_jax.refit.RefitConfig)
    config.refit.ridge = 0.01  # pull towards the averaged weights, a fraction of the mean eigenvalue of A^T A (held-out choice)
    config.refit.num_samples = 1000  # training inputs the layer regressions are fitted on (drawn with experiment.sample_seed)
    config.refit.batch_size = 250  # samples per pass (memory only)

    config.experiment = ml_collections.ConfigDict()  # what fuse.py makes: otfusion_jax.experiment.ExperimentConfig
    config.experiment.method = "ot-weights,ot-acts,recommended"  # the original's two, then ours (README); comma list: ot-weights | ot-acts (may end :exact / :sinkhorn / :orthogonal) | recommended | cca | wm | wm-refine | wm-soft | learned | wm-many | ot-many | ot-acts-many
    config.experiment.repair = False  # also REPAIR each fused model (its "+ REPAIR" rows)
    config.experiment.repair_output = False  # REPAIR the logits too (not in Jordan et al.; see docs/RESULTS.md)
    config.experiment.refit = False  # also refit each fused model by least squares (its "+ refit" rows; config.refit)
    config.experiment.learn_steps = 60  # "learned": Adam steps through Sinkhorn
    config.experiment.learn_weights = False  # "learned": also fit per-layer mixing weights (tends to pick one parent)
    config.experiment.num_samples = 200  # activation mode / BatchNorm recompute / REPAIR: training samples, >= 1 (paper: 200)
    config.experiment.acts_kind = "pre"  # activations before (pre) or after (post) the ReLU
    config.experiment.sample_seed = 0  # which training samples
    config.experiment.bn_stats = "align"  # align | recompute (BatchNorm statistics after fusion; recompute: models with BatchNorm)
    config.experiment.groups = ()  # tables to make, each a comma list of parent indices ("0,1"); (): all parents
    config.experiment.finetune_epochs = 0  # fine-tune each fused model (and vanilla) for this many epochs
    config.experiment.finetune_lr = config_dict.placeholder(float)  # fine-tuning lr; None: config.train.lr
    config.experiment.finetune_distill = 0.0  # fine-tuning: weight of the parents' soft targets (0: labels only)
    config.experiment.finetune_temperature = 1.0  # fine-tuning: their softmax temperature
    config.experiment.plots = True  # PNG plots next to results.json
    config.experiment.weights = config_dict.placeholder(tuple)  # per-parent averaging weights; None: 1/K
    config.experiment.ensemble_step = config_dict.placeholder(float)  # 2 parents: target's weight s (the original's --ensemble-step)
    config.experiment.target = -1  # index (in each group) of the parent whose widths and order the fused model takes
    config.experiment.many_method = "recommended"  # added to every table of > 2 parents unless listed (recommended: for > 2 MLPs / conv nets the best measured on held-out data); "": none
    config.experiment.barycenter_iterations = 10  # wm-many / ot-many / ot-acts-many: at most this many rounds of the iterative barycentre
    config.experiment.wm_rank = "train_loss"  # weight matching's restarts ranked by: train_loss (training images) | objective
    config.experiment.rank_samples = 2000  # wm_rank=train_loss: training images (not the test set)

    config.lock()
    return config
