"""Stage 03_metric: train the embedding on labeled + selected pseudo-labeled images with
pytorch-metric-learning (Musgrave et al. 2020) losses, miners and its m-per-class sampler.

Losses by name, weighted (``metric.losses: {arcface: 1.0, triplet: 1.0}``):

* ``triplet``          TripletMarginLoss (Schroff et al. 2015), margin ``metric.margin``;
* ``arcface``          ArcFaceLoss (Deng et al. 2019), or SubCenterArcFaceLoss (Deng et al. 2020) when
                       ``metric.sub_centers > 1``; its class centres are saved as a cosine classifier;
* ``contrastive``      ContrastiveLoss: the Siamese pair formulation (Hadsell et al. 2006);
* ``multi_similarity`` MultiSimilarityLoss (Wang et al. 2019);
* any other pytorch-metric-learning loss class by its name ("NTXentLoss", "CircleLoss",
  "LiftedStructureLoss", "NPairsLoss", "ProxyAnchorLoss", ...); extra constructor arguments
  in ``metric.loss_kwargs: {CircleLoss: {m: 0.4}}``; num_classes / embedding_size are filled in.

Miners (``metric.miner``): semihard | hard | all | easy (TripletMarginMiner types), any pml miner
class name (with ``metric.miner_kwargs``), or none. Mined tuples go to the tuple losses only
(losses without learnable parameters); classification losses (ArcFace, ...) see every sample.

The losses act on the encoder's pooled features, so embeddings("metric"), the encoder and the
ArcFace centres share one space: ``arcface_logits(embeddings, paths.arcface)`` gives class logits.
Batches: MPerClassSampler, m images of each class; uint8 images on the device, augmented there in
batches; bf16 autocast on CUDA; LR schedule computed up front; resumable per epoch.
"""
from __future__ import annotations

import inspect
import json
import time

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from tqdm import tqdm

from src import io
from src.augment import strong_augment, weak_augment
from src.config import Config, MetricCfg
from src.data.competition import read_label_table
from src.data.dataset import CompetitionData, load_data
from src.errors import UserError
from src.models.encoder import embed, load_encoder, save_encoder, to_input
from src.paths import RunPaths
from src.transductive import compute_prototypes
from src.pseudo.report import embedding_scores
from src.runtime import autocast, cpu_threads, resolve_device, sync, use_channels_last
from src.train_utils import Checkpointer, build_optimizer, param_groups, set_lr, warmup_cosine

STAGE_KEY = "metric"
EMBED_BATCH = 1024
LOSS_ALIASES = {"triplet": "TripletMarginLoss", "arcface": "ArcFaceLoss", "contrastive": "ContrastiveLoss",
                "multi_similarity": "MultiSimilarityLoss"}
TRIPLET_TYPES = ("semihard", "hard", "all", "easy")
AUGMENT = ("weak", "strong", "none")


# ---------------------------------------------------------------------------------------------
# Losses and miners by name
# ---------------------------------------------------------------------------------------------
def _pml_names(module, base) -> list[str]:
    return sorted(n for n in dir(module) if isinstance(getattr(module, n), type)
                  and issubclass(getattr(module, n), base) and getattr(module, n) is not base)


def loss_names() -> list[str]:
    return sorted(LOSS_ALIASES) + _pml_names(pml_losses, pml_losses.BaseMetricLossFunction)


def _init_params(cls) -> dict[str, inspect.Parameter]:
    """Named constructor parameters of cls and of the bases its **kwargs are passed on to."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__).parameters
        for key, p in sig.items():
            if key != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(key, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
            break
    return params


def _kwargs(cls, given: dict, where: str) -> dict:
    """Check constructor arguments by name; integral floats become ints where the default is an int
    (YAML/overrides give every value of these mappings as a float)."""
    params = _init_params(cls)
    out = {}
    for key, value in given.items():
        if key not in params:
            raise UserError(f"{where}: {cls.__name__} has no argument '{key}' (known: {', '.join(sorted(params))})")
        default = params[key].default
        out[key] = int(value) if isinstance(default, int) and not isinstance(default, bool) and \
            float(value).is_integer() else value
    return out


def build_loss(name: str, cfg: MetricCfg, n_classes: int, dim: int) -> nn.Module:
    """A pytorch-metric-learning loss from its alias or class name."""
    cls_name = LOSS_ALIASES.get(name, name)
    if name == "arcface" and cfg.sub_centers > 1:
        cls_name = "SubCenterArcFaceLoss"
    cls = getattr(pml_losses, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, pml_losses.BaseMetricLossFunction)) \
            or cls is pml_losses.BaseMetricLossFunction:
        raise UserError(f"metric.losses: unknown loss '{name}' (known: {', '.join(loss_names())})")
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict = {}
    if "num_classes" in params or cls_name == "SubCenterArcFaceLoss":
        kwargs["num_classes"] = n_classes
    if "embedding_size" in params or cls_name == "SubCenterArcFaceLoss":
        kwargs["embedding_size"] = dim
    if name == "triplet":
        kwargs["margin"] = cfg.margin
    if name == "arcface":
        kwargs |= {"margin": cfg.arcface_margin, "scale": cfg.arcface_scale}
        if cfg.sub_centers > 1:
            kwargs["sub_centers"] = cfg.sub_centers
    kwargs |= _kwargs(cls, cfg.loss_kwargs.get(name, {}), f"metric.loss_kwargs.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"metric.losses.{name}: cannot build {cls_name} ({exc})") from None


def build_miner(cfg: MetricCfg) -> nn.Module | None:
    name = cfg.miner
    if name in ("none", ""):
        return None
    if name in TRIPLET_TYPES:
        extra = _kwargs(pml_miners.TripletMarginMiner, cfg.miner_kwargs, "metric.miner_kwargs")
        return pml_miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets=name, **extra)
    cls = getattr(pml_miners, name, None)
    if not (isinstance(cls, type) and issubclass(cls, pml_miners.BaseMiner)) or cls is pml_miners.BaseMiner:
        known = ", ".join([*TRIPLET_TYPES, "none", *_pml_names(pml_miners, pml_miners.BaseMiner)])
        raise UserError(f"metric.miner: unknown miner '{name}' (known: {known})")
    try:
        return cls(**_kwargs(cls, cfg.miner_kwargs, "metric.miner_kwargs"))
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"metric.miner: cannot build {name} ({exc})") from None


class MetricObjective(nn.Module):
    """sum_i weight_i * loss_i(embeddings, labels); the miner's tuples feed the parameter-free
    (tuple) losses. forward((B, D) float, (B,) int64) -> (total, {name: loss}) device tensors."""

    def __init__(self, cfg: MetricCfg, n_classes: int, dim: int):
        super().__init__()
        self.names = list(cfg.losses)
        self.weights = dict(cfg.losses)
        self.losses = nn.ModuleList([build_loss(n, cfg, n_classes, dim) for n in self.names])
        self.miner = build_miner(cfg)
        self.tuple_loss = [not any(True for _ in loss.parameters()) for loss in self.losses]

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        tuples = self.miner(emb, labels) if self.miner is not None and any(self.tuple_loss) else None
        parts = {}
        for name, loss, is_tuple in zip(self.names, self.losses, self.tuple_loss):
            parts[name] = loss(emb, labels, indices_tuple=tuples if is_tuple else None)
        total = sum(self.weights[n] * parts[n] for n in self.names)
        return total, parts

    def arcface(self) -> tuple[nn.Module, str] | None:
        for name, loss in zip(self.names, self.losses):
            if isinstance(loss, pml_losses.ArcFaceLoss):
                return loss, name
        return None


def validate(cfg: Config, n_classes: int = 10, dim: int = 16) -> None:
    """Names, values and a smoke forward of the objective on random data: raises UserError before
    any training (an unusable loss, e.g. one needing ref_emb, fails here)."""
    m = cfg.metric
    if not m.losses:
        raise UserError("metric.losses: name at least one loss, e.g. {arcface: 1.0, triplet: 1.0}")
    for name, weight in m.losses.items():
        if weight <= 0:
            raise UserError(f"metric.losses.{name}: weight must be positive, got {weight}")
    for name in m.loss_kwargs:
        if name not in m.losses:
            raise UserError(f"metric.loss_kwargs: '{name}' is not one of metric.losses ({', '.join(m.losses)})")
    if m.augment not in AUGMENT:
        raise UserError(f"metric.augment: unknown value '{m.augment}' (known: {', '.join(AUGMENT)})")
    if m.m_per_class == 1 or m.m_per_class < 0:
        raise UserError(f"metric.m_per_class: must be 0 (batch_size // classes) or >= 2, got {m.m_per_class}")
    for key in ("epochs", "batch_size", "lr", "loss_lr", "sub_centers", "arcface_scale"):
        if getattr(m, key) <= 0:
            raise UserError(f"metric.{key}: must be positive, got {getattr(m, key)}")
    for key in ("weight_decay", "warmup_epochs", "margin", "max_steps_per_epoch", "cpu_threads"):
        if getattr(m, key) < 0:
            raise UserError(f"metric.{key}: must be >= 0, got {getattr(m, key)}")
    if not 0.0 <= m.min_confidence <= 1.0:
        raise UserError(f"metric.min_confidence: must be in [0, 1], got {m.min_confidence}")
    objective = MetricObjective(m, n_classes, dim)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4 * n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat(4)
    for name, loss, is_tuple in zip(objective.names, objective.losses, objective.tuple_loss):
        try:
            value = loss(emb, labels)
        except Exception as exc:  # noqa: BLE001  any failure of a third-party loss is a config problem here
            raise UserError(f"metric.losses.{name}: cannot be computed from (embeddings, labels) "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not torch.isfinite(value):
            raise UserError(f"metric.losses.{name}: not finite on random embeddings")


# ---------------------------------------------------------------------------------------------
# ArcFace centres as a cosine classifier
# ---------------------------------------------------------------------------------------------
def arcface_centres(loss: nn.Module) -> torch.Tensor:
    """pml ArcFace W (D, C*K), class-major columns -> unit-norm (C, K, D) centres."""
    k = getattr(loss, "sub_centers", 1)
    w = loss.W.detach().float().T  # (C*K, D)
    return torch.nn.functional.normalize(w.reshape(-1, k, w.shape[1]), dim=2)


@torch.no_grad()
def imprint_arcface(objective: MetricObjective, emb: np.ndarray, y: np.ndarray, n_classes: int) -> None:
    """Start the ArcFace centres at the class prototypes of the training images (weight imprinting,
    Qi et al. 2018): the classifier is meaningful from step 0 instead of random. Sub-centres get
    the prototype plus small noise so that they can specialise. emb (M, D) unit rows, y (M,)."""
    arc = objective.arcface()
    if arc is None:
        return
    loss = arc[0]
    k = getattr(loss, "sub_centers", 1)
    protos = torch.from_numpy(compute_prototypes(emb, y, n_classes))  # (C, D)
    centres = protos[:, None, :].repeat(1, k, 1)
    if k > 1:
        centres = centres + 0.01 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(0))
    loss.W.copy_(torch.nn.functional.normalize(centres, dim=2).reshape(-1, protos.shape[1]).T.to(loss.W))


def arcface_logits(emb: np.ndarray, path) -> np.ndarray:
    """Class logits (N, C) = scale * max over sub-centres of cos(embedding, centre) from the saved
    ArcFace file; emb (N, D) unit rows of embeddings("metric"). Softmax gives probabilities."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        weight, scale = f.get_tensor("weight"), float(f.metadata()["scale"])  # (C, K, D), float
    return scale * np.einsum("nd,ckd->nck", emb.astype(np.float32), weight).max(2)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def source_stage(paths: RunPaths) -> str:
    """The latest encoder: pseudo when it ran, else ssl."""
    return "pseudo" if paths.done_marker("pseudo").exists() and paths.encoder("pseudo").exists() else "ssl"


def training_rows(cfg: Config, paths: RunPaths, data: CompetitionData, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labeled rows + selected pseudo-labeled rows (confidence >= metric.min_confidence): (rows, class ids)."""
    rows, y = [data.labeled_idx], [data.class_ids[data.labeled_idx]]
    if source == "pseudo" and paths.pseudo_labels().exists():
        table = read_label_table(paths.pseudo_labels())
        table = table[table["selected"].astype(bool) & (table["confidence"] >= cfg.metric.min_confidence)]
        row_of = {image_id: i for i, image_id in enumerate(data.index["image_id"].tolist())}
        rows.append(np.array([row_of[i] for i in table["image_id"]], np.int64))
        y.append(data.encode(table["label"].tolist(), str(paths.pseudo_labels())))
    return np.concatenate(rows), np.concatenate(y)


def batch_shape(cfg: MetricCfg, n_classes: int) -> tuple[int, int]:
    """(m images per class, batch size): batch is a multiple of m with at most n_classes classes."""
    m = cfg.m_per_class or max(2, cfg.batch_size // n_classes)
    return m, max(m, min(cfg.batch_size, m * n_classes) // m * m)


def train(cfg: Config, paths: RunPaths) -> dict:
    device = resolve_device(cfg.run.device)
    with cpu_threads(device, cfg.metric.cpu_threads):
        return _train(cfg, paths, device)


def _train(cfg: Config, paths: RunPaths, device: torch.device) -> dict:
    data = load_data(paths)
    source = source_stage(paths)
    encoder = load_encoder(paths.encoder(source), paths.encoder_spec(source), device)
    validate(cfg, data.n_classes, encoder.dim)
    rows, y = training_rows(cfg, paths, data, source)
    m, batch = batch_shape(cfg.metric, data.n_classes)
    steps = max(1, -(-len(rows) // batch))
    if cfg.metric.max_steps_per_epoch:
        steps = min(steps, cfg.metric.max_steps_per_epoch)
    total = steps * cfg.metric.epochs
    print(f"metric: {len(rows)} training images ({len(data.labeled_idx)} labeled) from {source}; "
          f"batch {batch} = {batch // m} classes x {m}; {steps} steps/epoch")

    channels_last = use_channels_last(cfg.run.channels_last, device, encoder)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    objective = MetricObjective(cfg.metric, data.n_classes, encoder.dim).to(device)
    imprint_arcface(objective, io.read_npy(paths.embeddings(source))[rows].astype(np.float32), y, data.n_classes)
    groups = param_groups(encoder, cfg.metric.weight_decay)
    loss_params = [q for q in objective.parameters() if q.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr_scale": cfg.metric.loss_lr / cfg.metric.lr})
    optimizer = build_optimizer("sgd", groups, cfg.metric.lr, 0.9, device, "metric")
    lrs = warmup_cosine(cfg.metric.lr, total, int(cfg.metric.warmup_epochs * steps))
    pair = nn.ModuleDict({"encoder": encoder, "objective": objective})
    ckpt = Checkpointer(paths.checkpoint_dir(STAGE_KEY))
    state = ckpt.load(pair, optimizer, device)
    start = int(state["epoch"]) if state else 0
    if start:
        records = [r for r in io.read_jsonl(paths.log(STAGE_KEY)) if r["epoch"] <= start]
        io.write_text(paths.log(STAGE_KEY), "".join(json.dumps(r) + "\n" for r in records))
        print(f"resuming after epoch {start}/{cfg.metric.epochs}")
    net = encoder
    if cfg.run.compile:
        encoder.compile()  # in place: state_dict keys unchanged

    size = cfg.data.image_size
    aug = {"weak": lambda: weak_augment(size, channels_last), "strong": lambda: strong_augment(size, channels_last),
           "none": lambda: (lambda x, g=None: to_input(x, channels_last))}[cfg.metric.augment]()
    gpu_images = torch.from_numpy(np.array(data.images)).to(device)  # uint8 (N, H, W, 3), a writable copy
    rows_t, y_t = torch.from_numpy(rows).to(device), torch.from_numpy(y).to(device)
    sampler = MPerClassSampler(y, m, batch_size=batch, length_before_new_iter=steps * batch)
    for epoch in range(start, cfg.metric.epochs):
        net.train()
        g = torch.Generator(device=device).manual_seed(cfg.run.seed * 1_000_003 + epoch)
        order = torch.from_numpy(np.fromiter(iter(sampler), np.int64, steps * batch).reshape(steps, batch)).to(device)
        sums = torch.zeros(1 + len(objective.names), device=device)
        sync(device)
        t0 = time.perf_counter()
        for s in tqdm(range(steps), desc=f"metric {epoch + 1}/{cfg.metric.epochs}", disable=not cfg.run.progress,
                      mininterval=2):
            set_lr(optimizer, float(lrs[epoch * steps + s]))
            pick = order[s]
            x = aug(gpu_images[rows_t[pick]], g)
            with autocast(device, cfg.run.precision):
                feats = net(x)
            loss, parts = objective(feats.float(), y_t[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), *[parts[n].detach().float() for n in objective.names]])
        sync(device)
        seconds = time.perf_counter() - t0
        mean = (sums / steps).tolist()
        record = {"epoch": epoch + 1, "loss": round(mean[0], 5),
                  "parts": {n: round(v, 5) for n, v in zip(objective.names, mean[1:])},
                  "lr": float(lrs[(epoch + 1) * steps - 1]), "seconds": round(seconds, 2),
                  "images_per_s": round(steps * batch / max(seconds, 1e-9), 1)}
        ckpt.save(epoch + 1, pair, optimizer, steps_per_epoch=steps)
        io.append_jsonl(paths.log(STAGE_KEY), record)
    return finish(cfg, paths, data, encoder, objective, source, len(rows), device)


def finish(cfg: Config, paths: RunPaths, data: CompetitionData, encoder: nn.Module, objective: MetricObjective,
           source: str, n_train: int, device: torch.device) -> dict:
    save_encoder(encoder, paths.encoder(STAGE_KEY), paths.encoder_spec(STAGE_KEY),
                 extra={"stage": STAGE_KEY, "from": source, "losses": cfg.metric.losses})
    channels_last = use_channels_last(cfg.run.channels_last, device, encoder)
    emb = embed(encoder, data.images, device, EMBED_BATCH, cfg.run.precision, channels_last=channels_last,
                progress=cfg.run.progress, power=cfg.ssl.embed_power)
    io.write_npy(paths.embeddings(STAGE_KEY), emb.astype(np.float16))
    log = io.read_jsonl(paths.log(STAGE_KEY))
    summary = {"source": source, "train_images": n_train, "epochs": cfg.metric.epochs,
               "loss": log[-1]["loss"] if log else None, "parts": log[-1]["parts"] if log else {},
               "train_seconds": round(sum(r["seconds"] for r in log), 2)}
    before = embedding_scores(data, io.read_npy(paths.embeddings(source)).astype(np.float32), cfg.data.truth,
                              cfg.run.seed)
    after = embedding_scores(data, emb, cfg.data.truth, cfg.run.seed)
    summary |= {f"{k}_before": v for k, v in before.items()} | after
    arc = objective.arcface()
    if arc is not None:
        loss, name = arc
        io.save_tensors(paths.arcface, {"weight": arcface_centres(loss)},
                        metadata={"scale": str(float(loss.scale)), "margin_degrees": str(cfg.metric.arcface_margin),
                                  "sub_centers": str(getattr(loss, "sub_centers", 1)), "loss": name,
                                  "classes": json.dumps(data.classes.tolist())})
        if cfg.data.truth:  # reporting only
            from src.probe import truth_rows

            t_rows, t_labels = truth_rows(data, cfg.data.truth)
            pred = arcface_logits(emb[t_rows], paths.arcface).argmax(1)  # class ids
            summary["arcface_truth"] = round(float((pred == t_labels).mean()), 4)
    print("metric: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("parts",)))
    return summary
