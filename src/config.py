"""One typed configuration schema for every stage.

Defaults live here, in code. An experiment is a YAML file in ``configs/`` that overrides some of
them, and the command line overrides both with ``section.key=value`` pairs. Every value is checked
against the annotated type of its field, so ``ssl.epochs=ten`` or ``ssl.nope=1`` fail before any
work starts with a one-line message.

Usage::

    cfg = load_config("configs/demo.yaml", ["ssl.epochs=5", "run.device=cpu"])
    cfg.ssl.epochs  # -> 5
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.errors import UserError


# --------------------------------------------------------------------------------------------
# Sections. Each stage fingerprints only the sections it reads (see src/stages/__init__.py).
# --------------------------------------------------------------------------------------------
@dataclass
class RunCfg:
    name: str = "demo"  # run directory: <root>/<name>
    root: str = "runs"
    submissions_dir: str = "submissions"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # bf16 (autocast on CUDA only) | fp32
    channels_last: bool = True  # NHWC memory format (CUDA and CPU: oneDNN convolutions measured 1.2-1.5x faster on 2 Zen 3 cores)
    compile: bool = False  # torch.compile the encoder (pays off on long GPU runs)
    compile_stages: list[str] = field(default_factory=list)  # with compile: only these stages (e.g. [ssl]); empty: all
    num_workers: int = 0  # CPU data-loader workers for the per-image augmentation path
    progress: bool = True  # tqdm progress bars
    # Optional stages that run_all.py and bench.py pipeline leave out (any of OPTIONAL_STAGES); their old
    # outputs are removed so later stages never read them. E.g. [metric] when heads.embeddings is ssl.
    skip_stages: list[str] = field(default_factory=list)


@dataclass
class DataCfg:
    path: str = "input/digits"  # competition folder (train/ val/ test/ + CSVs)
    archive: str = ""  # optional .tar.xz/.tar.gz/.zip extracted into `path` when `path` is missing
    builder: str = ""  # digits | digits_names (class-name labels, ids with extension): build the demo into `path` when missing
    truth: str = ""  # optional image_id,label CSV of test labels: scoring and reports only
    image_size: int = 32
    # >0: the encoder resizes every image to this side (bilinear) before the network, e.g. 224 for
    # ImageNet-pretrained timm weights; costs (model_input_size / image_size)^2 times the FLOPs. 0: off
    model_input_size: int = 0
    skip_corrupt: bool = False  # skip (and count) undecodable images instead of failing
    # >= 0: 00_prepare keeps this many unlabeled train images (a fixed random sample, seed 0; 0: none);
    # labeled and test images are always kept. Bounds the cost of encoders that embed every image
    # (pretrained features at 224x224). -1: all
    unlabeled_limit: int = -1
    demo_test_size: int = 500  # digits builder: number of test images


@dataclass
class BackboneCfg:
    name: str = "resnet18"  # any timm model name
    small_stem: bool = True  # 3x3 stride-1 first conv, no max-pool: for 32x32 inputs
    # local weights file (.safetensors / weights-only .pth) for this timm model, or an installed weight
    # source (src/models/weights.py: efficientnet_lite0..2 for tf_efficientnet_lite0..2); never downloads
    pretrained: str = ""
    allow_download: bool = False  # true: timm fetches the model's pretrained weights from its hub (only when asked)
    width: int = 0  # >0: override timm's base width where supported (tiny CPU models)
    stem_width: int = 0  # >0: ResNet stem channels (timm default 64; dominates the cost of narrow CPU models)


@dataclass
class DedupCfg:
    # Near-duplicate search (EDA; nothing is removed): perceptual hashes of the cached images in
    # 00_prepare, embedding cosine in 05_heads; pairs and groups within and across splits.
    hash: bool = True  # 00_prepare: dHash + pHash search (faiss binary index)
    # a hash pair: dHash and pHash each differ in at most this many of 64 bits. On the real data
    # (60k CIFAR images) sampled pairs up to 8 bits all looked like re-edited copies; 6 finds
    # 96% of JPEG q60 re-saves and 97% of +30 brightness copies there
    hash_distance: int = 6
    embedding: bool = True  # 05_heads: search the heads' embeddings too
    embedding_cosine: float = 0.95  # an embedding pair: cosine >= this
    neighbors: int = 10  # candidates per image in each search
    report_pairs: int = 24  # most similar (not pixel-identical) pairs drawn in the run report
    test_support: bool = False  # 05_heads: a labeled image's near-duplicate test images join its class's support


@dataclass
class SSLCfg:
    objectives: dict[str, float] = field(default_factory=lambda: {"simclr": 1.0})
    epochs: int = 100  # 0: no training, the (pretrained) encoder embeds every image as it is
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adamw | lars
    lr: float = 0.06  # base LR for batch 256, scaled linearly with batch_size
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    momentum: float = 0.9
    temperature: float = 0.2  # SimCLR NT-Xent temperature
    proj_dim: int = 128
    proj_hidden: int = 2048
    ema: float = 0.99  # BYOL / DINO target momentum (cosine-increased to 1)
    dino_out_dim: int = 4096
    dino_teacher_temp: float = 0.04
    dino_student_temp: float = 0.1
    dino_center_momentum: float = 0.9
    n_local_crops: int = 0  # multi-crop (dino, simclr): extra small crops per image
    gpu_augment: str = "auto"  # auto (GPU path on CUDA) | gpu | cpu
    crop_scale_min: float = 0.2
    view_size: int = 0  # >0: side of the global views in training (e.g. 16: ~4x fewer FLOPs); embeddings keep image_size
    # precision of the training step and of the embedding passes on the CPU (with run.precision bf16): fp32 |
    # bf16 (autocast) | auto (bf16 when the CPU advertises native bf16 matmul, AMX-BF16 or AVX512-BF16; fp32
    # on Zen 3, where bf16 is emulated). Embeddings are written in float16 either way.
    cpu_precision: str = "fp32"
    flip: bool = True  # random horizontal flips (off for mirror-sensitive images such as digits)
    rotate_deg: float = 0.0  # random rotation in +-rotate_deg degrees (handwriting slant); 0: off
    color_jitter: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    checkpoint_every: int = 10  # epochs
    probe_every: int = 10  # epochs between kNN probes
    probe_k: int = 20
    max_steps_per_epoch: int = 0  # >0: cap (smoke tests / scale checks)
    embed_batch_size: int = 1024  # images per forward pass when embedding (small for large model inputs: cache)
    embed_flip: bool = False  # the written embeddings average each image's features with its mirror's
    # power transform sign(f) |f|^p of each pooled feature before L2 (Hu et al. 2021, eq. 1), in every written
    # embedding (01_ssl, 02_pseudo, 03_metric); 1: off. On frozen ImageNet EfficientNet-Lite features 0.5
    # lifted every head by 0.7-2.4 points and the submission by 1.3 (docs/RESULTS.md)
    embed_power: float = 1.0
    # CPU engine of the final embedding passes: torch | onnxruntime (the encoder exported to ONNX once, run
    # in fp32). EfficientNet-Lite0 at 224x224, 2 cores: ONNX Runtime at batch 64 ran 3.3x the images/s of
    # the best eager PyTorch fp32 setting (channels_last, batch 16) and 1.6x its bf16 autocast on AMX
    # (docs/RESULTS.md, "Feature extraction engines"). Ignored on CUDA.
    embed_engine: str = "torch"
    # frozen pretrained encoders whose embeddings are appended to the main encoder's: installed weight sources
    # (src/models/weights.py, e.g. [efficientnet_lite2]), each at its native resolution with the embedding
    # settings above. Each block is L2-normalised, then the whole row (equal weight per encoder). The saved
    # encoder computes the main block only: needs pseudo.rounds 0, metric and meta in run.skip_stages and no
    # heads.finetune_encoder.
    extra_encoders: list[str] = field(default_factory=list)
    min_lr_ratio: float = 0.0  # cosine schedule ends at lr * min_lr_ratio
    dino_bottleneck: int = 256  # DINO head bottleneck before the prototypes
    local_crop_size: int = 16  # multi-crop (dino, simclr): side of local crops in pixels (ViTs use image_size)
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.3])  # area fraction of local crops
    log_every: int = 50  # steps between progress-bar loss refreshes (the only in-epoch host sync)
    lr_find_steps: int = 100  # --lr-find: steps of the exponential LR sweep
    lr_find_min: float = 1e-4
    lr_find_max: float = 10.0
    # SwAV (Caron et al. 2020): online prototypes, Sinkhorn-Knopp codes, swapped prediction
    swav_prototypes: int = 3000  # K
    swav_temperature: float = 0.1  # softmax temperature of the predicted codes
    swav_epsilon: float = 0.05  # entropy regularisation of the Sinkhorn codes (smaller: sharper)
    # >0 (timm EfficientNet / MobileNet family): the final embedding pass runs the main encoder's stem and first
    # trunk_cut stages once over every image (and its mirror with embed_flip), caches those maps in float16
    # (trunk.npy) and embeds through the rest; pseudo.self_trainer=tail then trains the rest on the cache
    trunk_cut: int = 0
    swav_sinkhorn_iters: int = 3
    swav_queue_length: int = 0  # >0: past projections per global view join the Sinkhorn batch (small batches); 0: off
    swav_freeze_prototypes_steps: int = 0  # the prototypes get no gradient for the first steps (the paper: ~1 epoch)
    # DeepCluster-v2 (Caron et al. 2020): k-means of a memory bank of projections each epoch, targets = assignments
    deepcluster_prototypes: list[int] = field(default_factory=lambda: [3000, 3000, 3000])  # k of each k-means head
    deepcluster_temperature: float = 0.1
    deepcluster_kmeans_iters: int = 10


@dataclass
class PseudoCfg:
    # Round 0 labels the ssl embeddings; each further round self-trains the encoder on the previous
    # round's selection, re-embeds every image and labels again: rounds + 1 label tables in all.
    rounds: int = 2
    # Cross-fitting for local CV: runs every round again once per fold of the labeled images (fold k holds
    # out the k-th image of each class), as if those labels did not exist, and 05_heads predicts each
    # held-out image from its fold's embeddings and pseudo-labels. Without it, leave-one-out on self-trained
    # embeddings is optimistic (they learned labels propagated from the held-out image), and on round-0
    # pseudo-labels pessimistic (the held-out image's pseudo-labelled neighbours leave the fit with it).
    # 0: off; 2 up to the fewest labeled images of a class; -1: leave-one-out, every labeled image its own
    # fold, so each fold labels from 29 of the 30 labels, not 20 (round 0 reuses the run's kNN graph, about
    # a second a fold; trained rounds cost once per labeled image). Costs the rounds once more per fold.
    crossfit_folds: int = 0
    labelers: list[str] = field(default_factory=lambda: ["propagation", "kmeans", "prototype"])  # + scan, knn
    combine: str = "first"  # first (others: agreement only) | vote (majority) | mean | product (geometric mean)
    selection: str = "topk"  # threshold | topk | freematch
    threshold: float = 0.9  # selection=threshold: minimum confidence
    topk_fraction: float = 0.8  # per-class top-k: keep fraction * n_unlabeled / C most confident per class
    distribution_alignment: bool = True  # move the class marginal to uniform (classes known to be balanced)
    require_agreement: int = 2  # min labelers whose own label equals the combined one (capped at their number)
    temperature: float = 0.1  # cosine-softmax temperature of the prototype, knn and k-means posteriors
    center: bool = True  # labelers see mean-centred, re-normalised embeddings (CL2N, Wang et al. 2019)
    knn_k: int = 20
    propagation_alpha: float = 0.99
    propagation_gamma: float = 3.0  # graph affinity max(cos, 0) ** gamma (Iscen et al. 2019)
    propagation_iters: int = 20  # conjugate-gradient iterations
    kmeans_clusters: int = 100  # over-clustering (>= classes); mapped to classes through labeled images
    kmeans_iters: int = 25
    prototype_refine_iters: int = 3  # transductive soft k-means steps (prototype labeler)
    scan_epochs: int = 30
    scan_entropy_weight: float = 5.0
    scan_clusters: int = 0  # 0: number of classes (Hungarian mapping); more: many-to-one mapping
    scan_heads: int = 5  # heads trained at once; the lowest-loss one is kept
    scan_lr: float = 1e-2  # Adam (head only)
    scan_batch_size: int = 256  # shrunk on small sets to keep >= 8 steps per epoch
    scan_self_label_epochs: int = 10
    scan_self_label_threshold: float = 0.99
    # self-training between rounds: fixmatch (the whole encoder on weak/strong views of the images) | tail (the
    # stages after ssl.trunk_cut on 01_ssl's cached trunk maps, AdamW: the keys below give its epochs, batch,
    # lr and weight decay; the others are FixMatch's)
    self_trainer: str = "fixmatch"
    # tail: copies of each labeled image per epoch beside the pseudo-labeled ones (0: left out). On the real
    # competition 0 and 20 gave the same submission (public 0.6707 / 0.6713) and the same LOO (0.70, docs/RESULTS.md)
    tail_labeled_repeat: int = 20
    self_train_epochs: int = 10  # 0: no encoder training (later rounds only grow the prototype/knn supports)
    # >0: wall seconds of training steps per round. Steps FIT_FROM..FIT_AT of the first epoch are timed and the
    # round is shortened to what fits (the cosine schedule is recomputed for it); 0: all the epochs
    self_train_budget_s: float = 0.0
    self_train_batch_size: int = 64  # B labeled + selected pseudo-labeled images per step
    self_train_lr: float = 0.03  # SGD, for batch B = 64 (scaled linearly)
    self_train_weight_decay: float = 5e-4
    self_train_warmup_epochs: float = 0.5
    unlabeled_ratio: int = 7  # mu: unlabeled batch = mu * B
    consistency_threshold: float = 0.95  # FixMatch confidence threshold on the weak view
    self_adaptive_threshold: bool = False  # FreeMatch self-adaptive threshold instead of the fixed one
    consistency_weight: float = 1.0
    classifier: str = "cosine"  # cosine (initialised at the class prototypes) | linear
    classifier_temperature: float = 0.05  # cosine classifier logits = cos / T (scale 20: confident enough for FixMatch)
    ema: float = 0.999  # EMA of the weights; the EMA model embeds and predicts
    max_steps_per_epoch: int = 0  # >0: cap (smoke tests / scale checks)
    cpu_threads: int = 0  # CPU only: torch/BLAS threads for the stage (1 is fastest on a busy 2-core host); 0: default


@dataclass
class MetricCfg:
    # name -> weight; triplet | arcface | contrastive | multi_similarity | any pytorch-metric-learning loss class
    losses: dict[str, float] = field(default_factory=lambda: {"arcface": 1.0, "triplet": 1.0})
    loss_kwargs: dict[str, dict[str, float]] = field(default_factory=dict)  # extra constructor args per loss
    miner: str = "semihard"  # semihard | hard | all | none | any pytorch-metric-learning miner class
    miner_kwargs: dict[str, float] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256  # rounded down to a multiple of m_per_class
    m_per_class: int = 0  # images per class in a batch (MPerClassSampler); 0: batch_size // n_classes
    lr: float = 0.01  # SGD, encoder
    loss_lr: float = 0.1  # SGD, parameters of classification losses (ArcFace class centres)
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    margin: float = 0.2  # triplet margin and semihard/hard miner margin
    # degrees (pytorch-metric-learning convention). pml's face-recognition defaults (28.6, scale 64) gave a
    # chance-level classifier on the 10-class demo after short training; 10 and 16 did not.
    arcface_margin: float = 10.0
    arcface_scale: float = 16.0
    sub_centers: int = 1  # >1: sub-center ArcFace (Deng et al. 2020)
    augment: str = "weak"  # weak | strong | none
    min_confidence: float = 0.0  # selected pseudo-labels below this confidence are not used
    max_steps_per_epoch: int = 0
    cpu_threads: int = 0  # CPU only: torch/BLAS threads for the stage; 0: default


@dataclass
class HeadsCfg:
    heads: list[str] = field(
        default_factory=lambda: ["protonet", "protonet_transductive", "knn", "cosine_finetune", "logreg", "propagation"]
    )  # propagation: the member ensemble.method=preferred submits
    embeddings: str = "auto"  # which stage's embeddings: auto (latest of metric > pseudo > ssl) | ssl | pseudo | metric
    use_pseudo: bool = True  # extend supports with confident pseudo-labels (heads in pseudo_heads)
    pseudo_heads: list[str] = field(default_factory=lambda: ["protonet", "protonet_transductive", "knn"])
    pseudo_min_confidence: float = 0.0  # selected pseudo-labels below this confidence are not used
    pseudo_max_per_class: int = 2000  # cap (most confident first) to keep CV refits cheap; 0: all
    distance: str = "cosine"  # cosine | euclidean (ProtoNet; TIM's logits)
    protonet_temperature: float = 10.0  # cosine logit scale (ProtoNet and its transductive variant)
    knn_k: int = 10
    knn_temperature: float = 0.07  # vote weight exp(cos / tau) (Wu et al. 2018)
    transductive_iters: int = 10  # soft k-means refinement steps over the test embeddings
    transductive_temperature: float = 10.0
    balanced_prior: bool = True  # Sinkhorn-balance the soft assignments (equal class sizes)
    finetune_steps: int = 100
    finetune_lr: float = 0.01  # Adam, classifier weights
    finetune_encoder_lr: float = 1e-4  # Adam, encoder weights (finetune_encoder only)
    finetune_entropy_weight: float = 0.1  # Dhillon et al. 2020 transductive entropy term
    finetune_temperature: float = 10.0  # cosine-softmax scale
    finetune_query_batch: int = 256  # query rows per step for the entropy term
    finetune_encoder: bool = False  # also fine-tune the encoder (runs the latest saved encoder)
    tta_flip: bool = True  # heads that run the encoder average the image and its mirror
    logreg_c: float = 10.0
    # transductive heads (src/heads/transductive.py): propagation, pt_map, tim, laplacianshot, bd_cspn
    # auto (each method's own: propagation, laplacianshot cl2n; tim, bd_cspn l2n; pt_map power) or one of
    # none | power | l2n | cl2n | power_l2n | power_cl2n for all of them: one shared preprocessing step
    transductive_features: str = "auto"
    power_beta: float = 0.5  # power transform exponent (power_* features; Hu et al. 2021)
    transductive_set: str = "query"  # with all images known: query (test + held-out rows) | all (every unlabeled image)
    graph_k: int = 20  # kNN graph over all images (propagation; laplacianshot keeps laplacian_k of these)
    propagation_alpha: float = 0.99  # label spreading (Zhou et al. 2004)
    propagation_gamma: float = 3.0  # graph affinity max(cos, 0) ** gamma (Iscen et al. 2019)
    # PT-MAP centre updates (Hu et al. 2021; easyfsl's default 10). Over 10 support re-draws of the real data,
    # 20 steps let the centres drift on a weak encoder (-1.1 points); on the digits demo 10 vs 20: +-0 (RESULTS).
    ptmap_steps: int = 10
    ptmap_lr: float = 0.2  # fraction of the way each centre moves per step (the paper's alpha)
    ptmap_lambda: float = 10.0  # optimal-transport cost weight
    tim_steps: int = 50  # TIM-GD Adam steps (Boudiaf et al. 2020); distance picks l2 (paper) or cosine logits
    tim_lr: float = 2e-3
    tim_temperature: float = 15.0
    tim_weights: list[float] = field(default_factory=lambda: [0.1, 1.0, 0.1])  # CE, H(Y) marginal, H(Y|X)
    laplacian_k: int = 3  # LaplacianShot kNN kernel (Ziko et al. 2020)
    laplacian_lambda: float = 0.7
    laplacian_steps: int = 20  # bound updates (stops earlier when the bound converges)
    bdcspn_epsilon: float = 10.0  # BD-CSPN row weights exp(epsilon cos) (Liu et al. 2020)


@dataclass
class CVCfg:
    redraws: int = 200  # random support re-draws per shot count
    shots: list[int] = field(default_factory=lambda: [1, 2])
    episodes: int = 600
    n_way: int = 10
    n_shot: int = 2
    n_query: int = 15
    episode_min_confidence: float = 0.0  # episodes draw from the selected pseudo-labels at or above this
    encoder_max_fits: int = 20  # heads that fine-tune the encoder: cap on redraws and episodes each
    stack_folds: int = 5  # group folds of the out-of-fold features the stacker trains on
    stack_max_pseudo: int = 3000  # pseudo-labeled rows (class-balanced sample) in the stacker's table
    # the accuracy estimate printed beside LOO by 05_heads, 06_submit and pipelines/cv.py, and read by the
    # "estimated" rule (src/estimate.py; every estimator is written to the reports): temperature_wilson
    # (temperature scaling fitted on the LOO rows, its interval at least the LOO's Wilson interval: on the
    # six re-draw tables of the default rule, agreement, its coverage beats blend's on all six, its worst
    # error on five, and its mean error is within 0.5 point of blend's or better, by up to 3.1) | blend (the
    # mean of atc, atc_ne, doc and temperature: the pretrained recipes' estimator, better on agreement_rank
    # over their features) | loo | confidence | doc | atc | atc_ne | temperature | dawid_skene |
    # disagreement | aline | ppi
    estimator: str = "temperature_wilson"


@dataclass
class EnsembleCfg:
    # Rule submitted (src/ensemble.py RULES): mean | weighted | rank | stack | best (max LOO) | shrunk |
    # agreement | agreement_rank (agreement's weights on percentile ranks) | transductive | preferred |
    # preferred_mean | top (one-SE set) | gated | auto (best local CV among auto_candidates) | estimated
    # (highest cv.estimator estimate). Chosen on the re-draw evaluation
    # (pipelines/redraw.py, README, docs/RESULTS.md): on digits, 3 encoder seeds x 20 support draws,
    # agreement (label-free Dawid-Skene-style member weights) passes both bars, as do rank, mean, shrunk,
    # gated, preferred, while picking one member by an estimate (best, estimated) or weighting by the 30
    # labels (weighted, stack) fails. rank and agreement_rank submit softmax(mean rank / tau) at a label-free
    # tau matching the members' confidence. Pools with several 04_meta methods (the GPU configs) and the
    # pretrained recipes submit agreement_rank, which passed their tables; on the AVX2 demo pool it misses
    # the worst-draw bar by 0.2 point, so the default stays agreement.
    method: str = "agreement"
    members: list[str] = field(default_factory=list)  # empty: every member of the stages in `sources`
    sources: list[str] = field(default_factory=lambda: ["heads", "meta"])  # heads (05_heads) | meta (04_meta)
    # stages whose members count as one member (their mean) in every rule and label-free estimate: 04_meta's
    # methods share one episodic training and its errors, and eight of them would outvote the heads
    count_once: list[str] = field(default_factory=lambda: ["meta"])
    preferred: list[str] = field(default_factory=lambda: ["propagation", "knn"])  # preferred/gated: first present; preferred_mean: all
    auto_candidates: list[str] = field(default_factory=lambda: ["mean", "weighted", "rank", "stack"])
    agreement_iters: int = 10  # method=agreement / agreement_rank: re-weighting steps against the consensus
    gate_agreement: float = 0.9  # method=gated: mean pairwise test agreement at or above which the mean is used
    weight_rounds: int = 20  # greedy ensemble selection with replacement (Caruana et al. 2004)
    stacker_rounds: int = 200
    stacker_lr: float = 0.05
    stacker_leaves: int = 7
    write_best_single: bool = True
    report: bool = True
    report_tsne_points: int = 2000  # t-SNE subsample (test and labeled rows first)


@dataclass
class MetaCfg:
    # siamese | siamese_triplet | relation | protonet_episodic | maml | fomaml | reptile | metasgd
    methods: list[str] = field(default_factory=lambda: [
        "siamese", "siamese_triplet", "relation", "protonet_episodic", "maml", "fomaml", "reptile", "metasgd"])
    encoder: str = "auto"  # start from: auto (latest of metric > pseudo > ssl) | ssl | pseudo | metric
    train_block: bool = True  # meta-train the encoder's last block; false: frozen embeddings, heads only
    # episode pool: labeled (30 images; leave-one-out then re-meta-trains per fold) | pseudo (confident
    # pseudo-labels of unlabeled images) | clusters (k-means pseudo-classes, CACTUs) | auto (pseudo if present)
    pool: str = "auto"
    pseudo_threshold: float = 0.9  # pseudo pool: rows with selected == True or confidence >= this
    pool_per_class: int = 200  # cap on pool images per class (bounds cached features); 0: all
    clusters: int = 50  # clusters pool: k-means clusters per clustering
    clusterings: int = 1  # clusters pool: independent k-means partitions (CACTUs uses several)
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 5
    # Task augmentation of the MAML family's and protonet_episodic's training episodes: none | rot90 (each
    # class x 4 quarter-turn rotations, each rotation a class of its own) | image (per-episode flip + shift of
    # every image) | rot90+image
    task_augment: str = "none"
    task_augment_flip: bool = True  # image: random horizontal flips (off for mirror-sensitive images: digits)
    episodes: int = 200  # meta-iterations (optimiser steps), each over meta_batch episodes
    meta_batch: int = 4
    outer_lr: float = 1e-3  # Adam, every method's meta-parameters
    inner_steps: int = 5  # MAML family: adaptation steps during meta-training
    test_inner_steps: int = 10  # MAML family: adaptation steps on the labeled support at inference
    inner_lr: float = 0.1  # MAML family: inner SGD step (Meta-SGD: initial per-entry step)
    first_order: bool = False  # maml: drop second-order terms (fomaml is always first-order)
    reptile_epsilon: float = 1.0  # Reptile outer step size, decayed linearly to 0
    hidden: int = 64  # relation module width
    margin: float = 0.2  # siamese_triplet margin (on L2-normalised embeddings)
    temperature: float = 10.0  # cosine logit scale: siamese_triplet scores; MAML family head input scale * h/|h|
    batch_size: int = 512  # inference and trunk-feature batch
    log_every: int = 20  # meta-iterations per log line
    checkpoint_every: int = 50  # meta-iterations per checkpoint (resume); 0: never
    cpu_threads: int = 1  # CPU intra-op threads while the methods run (tiny ops stall with more); 0: torch default


@dataclass
class BenchCfg:
    """`pipelines/bench.py pipeline`: the recipe's time and memory budget, checked against the measurement.
    No stage reads this section (changing it reruns nothing)."""
    stage_budget_s: dict[str, float] = field(default_factory=dict)  # stage key (ssl, pseudo, ...) -> seconds, wall
    budget_s: float = 0.0  # whole pipeline, wall seconds; 0: no budget
    max_gpu_memory_gb: float = 0.0  # peak torch.cuda.max_memory_allocated of any stage (GB = 1e9 B); 0: no cap
    roof_size: int = 0  # n of the n x n matmul (in the SSL step's dtype) that measures the roof; 0: 4096 (CPU) / 8192 (CUDA)
    # >0: time this many SSL steps (bench.py ssl, beside 00_prepare) and set ssl.epochs to what fits
    # stage_budget_s.ssl at the measured speed, at most ssl_max_epochs; 0: keep ssl.epochs
    ssl_probe_steps: int = 0
    ssl_max_epochs: int = 0  # 0: ssl.epochs (the fit only shortens)
    ssl_overhead_s: float = 20.0  # seconds of 01_ssl that are not training steps (start-up, probes, embeddings)


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    dedup: DedupCfg = field(default_factory=DedupCfg)
    ssl: SSLCfg = field(default_factory=SSLCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    metric: MetricCfg = field(default_factory=MetricCfg)
    heads: HeadsCfg = field(default_factory=HeadsCfg)
    cv: CVCfg = field(default_factory=CVCfg)
    ensemble: EnsembleCfg = field(default_factory=EnsembleCfg)
    meta: MetaCfg = field(default_factory=MetaCfg)
    bench: BenchCfg = field(default_factory=BenchCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (used to decide whether a stage must rerun)."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def hash(self) -> str:
        return self.section_hash(*[f.name for f in dataclasses.fields(self)])


# --------------------------------------------------------------------------------------------
# Type checking and merging
# --------------------------------------------------------------------------------------------
def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` coerced to annotated type `tp`, or raise UserError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise UserError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return {_check(k, key_tp, where): _check(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} at {where}")  # programming error


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise UserError(f"{where}: unknown key '{key}' (known: {known})")
        setattr(section, key, _check(value, hints[key], f"{where}.{key}"))


def _merge(cfg: Config, tree: dict[str, Any], where: str) -> None:
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected a mapping of sections")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, values in tree.items():
        if name not in sections:
            raise UserError(f"{where}: unknown section '{name}' (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{name}' must be a mapping")
        _apply(getattr(cfg, name), values, f"{where}: {name}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'ssl.epochs=5' -> ('ssl', 'epochs', 5). Values are parsed as YAML scalars/lists/maps."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"override '{text}': expected section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = yaml.safe_load(rhs) if rhs.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override '{text}': cannot parse value ({exc.__class__.__name__})") from None
    if value is None:
        value = ""
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
        _merge(cfg, tree, str(p))
    for text in overrides or []:
        section, key, value = parse_override(text)
        # YAML turns "1e-3" into a str; accept it for float fields.
        hints = typing.get_type_hints(type(getattr(cfg, section, None) or cfg))
        if hints.get(key) is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _merge(cfg, {section: {key: value}}, f"override '{text}'")
    validate(cfg)
    return cfg


# Stages the submission can do without (their consumers list them as optional_after; tests/test_runner.py
# checks this against the stage graph).
STAGES = ("prepare", "ssl", "pseudo", "metric", "meta", "heads", "submit")  # in order (src/paths.py: NN_<key>/)
OPTIONAL_STAGES = ("pseudo", "metric", "meta")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express. Stage-specific checks live with the stage."""
    for key in cfg.run.skip_stages:
        if key not in OPTIONAL_STAGES:
            raise UserError(f"run.skip_stages: '{key}' cannot be skipped (optional stages: "
                            f"{', '.join(OPTIONAL_STAGES)})")
    if cfg.run.precision not in ("bf16", "fp32"):
        raise UserError(f"run.precision: expected bf16 or fp32, got '{cfg.run.precision}'")
    if not (cfg.run.device == "auto" or cfg.run.device == "cpu" or cfg.run.device.startswith("cuda")):
        raise UserError(f"run.device: expected auto, cpu or cuda[:N], got '{cfg.run.device}'")
    for name, value in (("pseudo.threshold", cfg.pseudo.threshold),
                        ("pseudo.topk_fraction", cfg.pseudo.topk_fraction),
                        ("pseudo.consistency_threshold", cfg.pseudo.consistency_threshold),
                        ("cv.episode_min_confidence", cfg.cv.episode_min_confidence)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name}: must be in [0, 1], got {value}")
    validate_heads(cfg.heads)
    if cfg.data.image_size <= 0:
        raise UserError(f"data.image_size: must be positive, got {cfg.data.image_size}")
    if not 0.0 < cfg.ssl.embed_power <= 1.0:
        raise UserError(f"ssl.embed_power: must be in (0, 1] (1: off), got {cfg.ssl.embed_power}")
    if cfg.ssl.trunk_cut < 0:
        raise UserError(f"ssl.trunk_cut: must be >= 0 (0: off), got {cfg.ssl.trunk_cut}")
    if cfg.dedup.hash_distance < 0 or cfg.dedup.hash_distance > 64:
        raise UserError(f"dedup.hash_distance: must be in [0, 64], got {cfg.dedup.hash_distance}")
    if not -1.0 <= cfg.dedup.embedding_cosine <= 1.0:
        raise UserError(f"dedup.embedding_cosine: must be in [-1, 1], got {cfg.dedup.embedding_cosine}")
    if cfg.dedup.neighbors < 1 or cfg.dedup.report_pairs < 0:
        raise UserError("dedup.neighbors: must be >= 1 and dedup.report_pairs >= 0")
    if cfg.data.unlabeled_limit < -1:
        raise UserError(f"data.unlabeled_limit: must be >= -1 (-1: all, 0: none), got {cfg.data.unlabeled_limit}")
    if cfg.data.model_input_size < 0:
        raise UserError(f"data.model_input_size: must be >= 0 (0: off), got {cfg.data.model_input_size}")
    for name in cfg.run.compile_stages:
        if name not in STAGES:
            raise UserError(f"run.compile_stages: unknown stage '{name}' (known: {', '.join(STAGES)})")
    for name, seconds in cfg.bench.stage_budget_s.items():
        if name not in STAGES:
            raise UserError(f"bench.stage_budget_s: unknown stage '{name}' (known: {', '.join(STAGES)})")
        if not seconds > 0:
            raise UserError(f"bench.stage_budget_s.{name}: must be positive, got {seconds}")
    for key in ("budget_s", "max_gpu_memory_gb", "roof_size", "ssl_probe_steps", "ssl_max_epochs", "ssl_overhead_s"):
        if getattr(cfg.bench, key) < 0:
            raise UserError(f"bench.{key}: must be >= 0, got {getattr(cfg.bench, key)}")
    if cfg.bench.ssl_probe_steps and not cfg.bench.stage_budget_s.get("ssl"):
        raise UserError("bench.ssl_probe_steps: needs bench.stage_budget_s.ssl (the seconds to fit the epochs into)")


def for_stage(cfg: Config, stage_key: str) -> Config:
    """The config a stage runs with: run.compile applies only to the stages in run.compile_stages
    when that list is set (compile time pays only on long training loops)."""
    if not cfg.run.compile_stages:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, compile=cfg.run.compile
                                                                and stage_key in cfg.run.compile_stages))


def validate_heads(h: HeadsCfg) -> None:
    """Ranges of the transductive heads' keys (src/heads/transductive.py)."""
    features = ("auto", "none", "power", "l2n", "cl2n", "power_l2n", "power_cl2n")  # auto + src.transductive.FEATURES
    if h.transductive_features not in features:
        raise UserError(f"heads.transductive_features: expected one of {', '.join(features)}, "
                        f"got '{h.transductive_features}'")
    if h.transductive_set not in ("query", "all"):
        raise UserError(f"heads.transductive_set: expected query or all, got '{h.transductive_set}'")
    for name in ("graph_k", "laplacian_k"):
        if getattr(h, name) < 1:
            raise UserError(f"heads.{name}: must be >= 1, got {getattr(h, name)}")
    for name in ("ptmap_steps", "tim_steps", "laplacian_steps"):
        if getattr(h, name) < 0:
            raise UserError(f"heads.{name}: must be >= 0, got {getattr(h, name)}")
    for name in ("power_beta", "ptmap_lambda", "tim_temperature", "tim_lr", "propagation_gamma"):
        if getattr(h, name) <= 0:
            raise UserError(f"heads.{name}: must be > 0, got {getattr(h, name)}")
    for name in ("laplacian_lambda", "bdcspn_epsilon"):
        if getattr(h, name) < 0:
            raise UserError(f"heads.{name}: must be >= 0, got {getattr(h, name)}")
    if not 0.0 < h.ptmap_lr <= 1.0:
        raise UserError(f"heads.ptmap_lr: must be in (0, 1], got {h.ptmap_lr}")
    if not 0.0 < h.propagation_alpha < 1.0:
        raise UserError(f"heads.propagation_alpha: must be in (0, 1), got {h.propagation_alpha}")
    if len(h.tim_weights) != 3 or min(h.tim_weights) < 0:
        raise UserError(f"heads.tim_weights: expected three weights >= 0 [CE, H(Y), H(Y|X)], got {h.tim_weights}")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
