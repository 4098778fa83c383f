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
    channels_last: bool = True  # NHWC memory format on CUDA
    compile: bool = False  # torch.compile the encoder (pays off on long GPU runs)
    num_workers: int = 0  # CPU data-loader workers for the per-image augmentation path
    progress: bool = True  # tqdm progress bars


@dataclass
class DataCfg:
    path: str = "input/digits"  # competition folder (train/ val/ test/ + CSVs)
    archive: str = ""  # optional .tar.xz/.tar.gz/.zip extracted into `path` when `path` is missing
    builder: str = ""  # "digits": build the embedded demo competition into `path` when missing
    truth: str = ""  # optional image_id,label CSV of test labels: scoring and reports only
    image_size: int = 32
    skip_corrupt: bool = False  # skip (and count) undecodable images instead of failing
    demo_test_size: int = 500  # digits builder: number of test images


@dataclass
class BackboneCfg:
    name: str = "resnet18"  # any timm model name
    small_stem: bool = True  # 3x3 stride-1 first conv, no max-pool: for 32x32 inputs
    pretrained: str = ""  # local weights file (.safetensors / .pth); never downloads
    allow_download: bool = False  # let timm fetch pretrained weights (user must ask)
    width: int = 0  # >0: override timm's base width where supported (tiny CPU models)


@dataclass
class SSLCfg:
    objectives: dict[str, float] = field(default_factory=lambda: {"simclr": 1.0})
    epochs: int = 100
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
    n_local_crops: int = 0  # DINO multi-crop: extra small crops per image
    gpu_augment: str = "auto"  # auto (GPU path on CUDA) | gpu | cpu
    crop_scale_min: float = 0.2
    color_jitter: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    checkpoint_every: int = 10  # epochs
    probe_every: int = 10  # epochs between kNN probes
    probe_k: int = 20
    max_steps_per_epoch: int = 0  # >0: cap (smoke tests / scale checks)
    embed_batch_size: int = 1024


@dataclass
class PseudoCfg:
    rounds: int = 2
    labelers: list[str] = field(default_factory=lambda: ["propagation", "kmeans", "prototype"])
    combine: str = "vote"  # vote: agreement filter + confidence product | first
    selection: str = "topk"  # threshold | topk | freematch
    threshold: float = 0.9
    topk_fraction: float = 0.8  # per-class top-k: fraction of images kept (class balanced)
    distribution_alignment: bool = True  # assume balanced classes
    require_agreement: int = 1  # min number of labelers agreeing
    knn_k: int = 20
    propagation_alpha: float = 0.99
    propagation_iters: int = 20
    kmeans_clusters: int = 100  # over-clustering; mapped to classes through labeled images
    kmeans_iters: int = 25
    scan_epochs: int = 30
    scan_entropy_weight: float = 5.0
    scan_clusters: int = 0  # 0: number of classes
    # self-training (FixMatch-style) between rounds
    self_train_epochs: int = 10
    self_train_batch_size: int = 256
    self_train_lr: float = 0.03
    unlabeled_ratio: int = 7  # mu: unlabeled batch = mu * labeled batch
    consistency_threshold: float = 0.95
    consistency_weight: float = 1.0
    ema: float = 0.999
    max_steps_per_epoch: int = 0


@dataclass
class MetricCfg:
    losses: dict[str, float] = field(default_factory=lambda: {"arcface": 1.0, "triplet": 1.0})
    miner: str = "semihard"  # semihard | hard | all | none | any pytorch-metric-learning miner
    epochs: int = 10
    batch_size: int = 256
    m_per_class: int = 8
    lr: float = 0.01
    weight_decay: float = 5e-4
    embed_dim: int = 128
    margin: float = 0.2  # triplet / contrastive margin
    arcface_margin: float = 28.6  # degrees (pytorch-metric-learning convention)
    arcface_scale: float = 64.0
    sub_centers: int = 1  # >1: sub-center ArcFace
    min_confidence: float = 0.0  # pseudo-labels below this confidence are not used
    max_steps_per_epoch: int = 0


@dataclass
class HeadsCfg:
    heads: list[str] = field(
        default_factory=lambda: ["protonet", "protonet_transductive", "knn", "cosine_finetune", "logreg"]
    )
    embeddings: str = "auto"  # which stage's embeddings: auto (latest) | ssl | pseudo | metric
    use_pseudo: bool = True  # extend supports with confident pseudo-labels
    pseudo_min_confidence: float = 0.0
    distance: str = "cosine"  # cosine | euclidean (ProtoNet)
    knn_k: int = 10
    transductive_iters: int = 10
    transductive_temperature: float = 10.0
    balanced_prior: bool = True
    finetune_steps: int = 100
    finetune_lr: float = 0.01
    finetune_entropy_weight: float = 0.1
    finetune_temperature: float = 10.0
    finetune_encoder: bool = False
    tta_flip: bool = True
    logreg_c: float = 1.0


@dataclass
class CVCfg:
    redraws: int = 200  # random support re-draws per shot count
    shots: list[int] = field(default_factory=lambda: [1, 2])
    episodes: int = 600
    n_way: int = 10
    n_shot: int = 2
    n_query: int = 15
    episode_min_confidence: float = 0.9


@dataclass
class EnsembleCfg:
    method: str = "weighted"  # mean | weighted | rank | stack
    members: list[str] = field(default_factory=list)  # empty: every head that ran
    stacker_folds: int = 5
    stacker_rounds: int = 200
    write_best_single: bool = True


@dataclass
class MetaCfg:
    methods: list[str] = field(
        default_factory=lambda: ["siamese", "relation", "protonet_episodic", "maml", "fomaml", "reptile"]
    )
    pool: str = "auto"  # labeled | pseudo | clusters | auto
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 5
    episodes: int = 200
    inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    first_order: bool = False
    meta_batch: int = 4
    clusters: int = 50


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    ssl: SSLCfg = field(default_factory=SSLCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    metric: MetricCfg = field(default_factory=MetricCfg)
    heads: HeadsCfg = field(default_factory=HeadsCfg)
    cv: CVCfg = field(default_factory=CVCfg)
    ensemble: EnsembleCfg = field(default_factory=EnsembleCfg)
    meta: MetaCfg = field(default_factory=MetaCfg)

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


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express. Stage-specific checks live with the stage."""
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
    if cfg.data.image_size <= 0:
        raise UserError(f"data.image_size: must be positive, got {cfg.data.image_size}")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
