"""Stage 04: meta-learning and pairwise methods (src/meta) as inference heads.

For every method in ``meta.methods`` it meta-trains on episodes of the chosen pool, starting from
the latest encoder (metric > pseudo > ssl, or ``meta.encoder``), and writes the head contract:
``paths.head_probs(method, "meta")`` float32 (n_test, C) and ``paths.head_oof(method, "meta")``
float32 (n_labeled, C), leave-one-out probabilities of the labeled images; plus
``<method>/summary.json`` (LOO accuracy with Wilson interval, public-truth accuracy when
configured, wall time, peak memory) and ``summary.json`` over all methods.

Leakage: a held-out labeled image's label is never used to predict it. The ``pseudo`` and
``clusters`` pools contain unlabeled images only (the labeled images are left out of the pool), so
one meta-training serves every fold: leave-one-out then only removes the image from the support
the method adapts to. The ``labeled`` pool is made of the labeled images themselves, so each fold
re-meta-trains without its held-out image (30 trainings: small configs only). The pseudo-labels
were made with all labels, so their global choices saw every label: mildly optimistic, as for
the heads.

Resume: a method whose outputs exist is skipped; an interrupted meta-training resumes from its
checkpoint in ``04_meta/ckpt/`` (episodes are a function of seed and iteration).
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from src import io
from src.config import Config
from src.cv import cv_summary, format_interval, leave_one_out, public_truth, truth_accuracy
from src.data import CompetitionData, load_data
from src.errors import UserError
from src.meta import META_METHODS
from src.meta.base import (EncoderTail, FeatureBank, Identity, MetaMethod, PeakMemory, TrunkCache, meta_train,
                           trunk_features)
from src.meta.sampler import (POOLS, EpisodeSampler, Pool, cap_per_class, cluster_pool, labeled_pool,
                              pseudo_pool, pseudo_pool_of)
from src.meta.task_augment import TaskAugment, build_task_augment, parse_mode
from src.paths import RunPaths
from src.runtime import cpu_threads, resolve_device, use_channels_last
from src.stages import Stage

ENCODER_STAGES = ("metric", "pseudo", "ssl")  # latest first


def validate(cfg: Config) -> None:
    m = cfg.meta
    if not m.methods:
        raise UserError("meta.methods: empty list (name at least one method)")
    for name in m.methods:
        META_METHODS.get(name)  # unknown -> UserError listing the known ones
    if m.pool not in POOLS:
        raise UserError(f"meta.pool: expected one of {', '.join(POOLS)}, got '{m.pool}'")
    if m.encoder not in ("auto", *ENCODER_STAGES):
        raise UserError(f"meta.encoder: expected auto, ssl, pseudo or metric, got '{m.encoder}'")
    for key in ("episodes", "inner_steps", "test_inner_steps", "pool_per_class", "checkpoint_every", "cpu_threads"):
        if getattr(m, key) < 0:
            raise UserError(f"meta.{key}: must be >= 0, got {getattr(m, key)}")
    for key in ("meta_batch", "clusterings", "batch_size", "hidden", "log_every"):
        if getattr(m, key) < 1:
            raise UserError(f"meta.{key}: must be >= 1, got {getattr(m, key)}")
    if not 0.0 <= m.pseudo_threshold <= 1.0:
        raise UserError(f"meta.pseudo_threshold: must be in [0, 1], got {m.pseudo_threshold}")
    if m.outer_lr <= 0 or m.inner_lr <= 0:
        raise UserError(f"meta.outer_lr / meta.inner_lr: must be > 0, got {m.outer_lr} / {m.inner_lr}")
    parse_mode(m.task_augment)


def needs_encoder(cfg: Config) -> bool:
    """The encoder is loaded to train its last block, or to compute augmented episodes' inputs."""
    return cfg.meta.train_block or cfg.meta.task_augment != "none"


def encoder_stage(cfg: Config, paths: RunPaths) -> str:
    """The stage whose encoder (train_block) or embeddings the methods start from."""
    def has(stage: str) -> bool:
        files = ([paths.encoder(stage), paths.encoder_spec(stage)] if needs_encoder(cfg) else [])
        if cfg.meta.pool in ("clusters", "auto") or not cfg.meta.train_block:
            files.append(paths.embeddings(stage))
        return all(f.exists() for f in files)

    if cfg.meta.encoder == "auto":
        for stage in ENCODER_STAGES:
            if paths.done_marker(stage).exists() and has(stage):
                return stage
        raise UserError(f"{paths.encoder('ssl')}: no encoder found (run 01_ssl first)")
    if not has(cfg.meta.encoder):
        raise UserError(f"{paths.encoder(cfg.meta.encoder)}: meta.encoder={cfg.meta.encoder} but that stage "
                        f"wrote no encoder/embeddings")
    return cfg.meta.encoder


def build_pool(cfg: Config, paths: RunPaths, data: CompetitionData, source: str,
               labels: pd.DataFrame | None = None, emb: np.ndarray | None = None) -> Pool:
    """The episode pool of meta.pool. labels / emb: a 02_pseudo label table and the `source`
    embeddings (N, D) to read instead of the run's files (the re-draw evaluation passes its draw's)."""
    m = cfg.meta
    kind = m.pool
    if kind == "auto":
        kind = "pseudo" if labels is not None or (paths.done_marker("pseudo").exists()
                                                  and paths.pseudo_labels().exists()) else "clusters"
    rng = np.random.default_rng(cfg.run.seed)
    if kind == "labeled":
        return labeled_pool(data)
    if kind == "pseudo":
        pool = (pseudo_pool(data, paths.pseudo_labels(), m.pseudo_threshold, include_labeled=False) if labels is None
                else pseudo_pool_of(data, labels, m.pseudo_threshold, include_labeled=False))
    else:
        where = paths.embeddings(source)
        emb = io.read_npy(where, mmap=True) if emb is None else emb
        if len(emb) != len(data.index):
            raise UserError(f"{where}: {len(emb)} rows, expected {len(data.index)}")
        rows = data.unlabeled_idx
        pool = cluster_pool(emb, rows, m.clusters, m.n_way, m.n_shot + m.n_query, m.clusterings, cfg.run.seed)
    return cap_per_class(pool, m.pool_per_class, rng)


def make_sampler(cfg: Config, pool: Pool) -> EpisodeSampler:
    return EpisodeSampler(pool, cfg.meta.n_way, cfg.meta.n_shot, cfg.meta.n_query)


@dataclass
class MetaInputs:
    """What every method's fits draw from; rows are rows of the prepared index."""

    cfg: Config
    source: str  # stage of the encoder / embeddings
    device: torch.device
    encoder: nn.Module | None  # None when meta.train_block is false
    dim: int  # input dimension of an Identity body (train_block false)
    pool: Pool
    sampler: EpisodeSampler
    bank: FeatureBank  # body inputs of pool, labeled and test rows
    labeled: np.ndarray  # (L,) rows
    labeled_y: np.ndarray  # (L,) class ids
    test: np.ndarray  # (T,) rows
    n_classes: int
    truth: np.ndarray | None  # (T,) public-truth class ids: scoring only
    trunk_seconds: float = 0.0
    augment: TaskAugment | None = None  # meta.task_augment: episodes of the methods that take it

    def body(self) -> nn.Module:
        trained = self.cfg.meta.train_block and self.encoder is not None
        return EncoderTail(self.encoder) if trained else Identity(self.dim)

    def augmented(self, name: str) -> bool:
        return self.augment is not None and META_METHODS.get(name).task_augment

    def episodes(self, name: str, pool: Pool | None = None):
        """(sampler, bank) that method `name` meta-trains on: task-augmented when it takes it."""
        if not self.augmented(name):
            return (self.sampler if pool is None else make_sampler(self.cfg, pool)), self.bank
        m = self.cfg.meta
        sampler = self.augment.sampler(self.pool if pool is None else pool, m.n_way, m.n_shot, m.n_query)
        return sampler, self.augment.bank


def prepare_inputs(cfg: Config, paths: RunPaths) -> MetaInputs:
    """Validate, build the pool and its sampler (errors before any heavy work), then cache the
    body inputs (trunk features or embeddings) of every row the methods need."""
    validate(cfg)
    data = load_data(paths)
    source = encoder_stage(cfg, paths)
    pool = build_pool(cfg, paths, data, source)
    make_sampler(cfg, pool)  # refuses a pool too small for the episodes before any heavy work
    if pool.kind == "labeled":  # each leave-one-out fold meta-trains without one image
        counts = pool.class_counts()
        smallest = min(counts, key=counts.get)
        make_sampler(cfg, pool.without_rows(pool.rows[pool.labels == smallest][:1]))
    if cfg.meta.task_augment != "none":  # refuses impossible augmented episodes before any heavy work
        TaskAugment(cfg.meta.task_augment, len(data.index), None).sampler(pool, cfg.meta.n_way, cfg.meta.n_shot,
                                                                          cfg.meta.n_query)
    truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
    device = resolve_device(cfg.run.device)
    encoder = None
    if needs_encoder(cfg):
        from src.models.encoder import load_encoder

        encoder = load_encoder(paths.encoder(source), paths.encoder_spec(source), device)
    emb = None if cfg.meta.train_block else io.read_npy(paths.embeddings(source), mmap=True)
    return assemble_inputs(cfg, data, source, pool, device, encoder, emb, truth)


def assemble_inputs(cfg: Config, data: CompetitionData, source: str, pool: Pool, device: torch.device,
                    encoder: nn.Module | None, emb: np.ndarray | None, truth: np.ndarray | None = None,
                    verbose: bool = True, trunk: TrunkCache | None = None) -> MetaInputs:
    """MetaInputs over `data`'s labeled and test rows and `pool`: the body inputs of every row the
    methods read (trunk features of `encoder` with meta.train_block, else the rows of `emb` (N, D)
    L2-normalised). Shared by 04_meta and the re-draw evaluation (src/selection.py), whose draws
    pass one `trunk` cache of `encoder`'s features so that each image's are computed once."""
    labeled, test = data.labeled_idx, data.test_idx
    rows = np.unique(np.concatenate([pool.rows, labeled, test]))
    t0 = time.perf_counter()
    dim = 0
    if cfg.meta.train_block:
        progress = cfg.run.progress and verbose
        feats = (trunk_features(encoder, data.images, rows, device, cfg.meta.batch_size, cfg.run.precision, progress)
                 if trunk is None else trunk(rows, progress))
        if use_channels_last(cfg.run.channels_last, device, encoder) and feats.dim() == 4:
            feats = feats.contiguous(memory_format=torch.channels_last)
    else:
        feats = torch.nn.functional.normalize(torch.from_numpy(np.asarray(emb[rows], np.float32)), dim=1)
        feats, dim = feats.to(device, torch.float16), emb.shape[1]
    bank = FeatureBank(rows, feats, len(data.index))
    channels_last = device.type == "cuda" and cfg.run.channels_last
    augment = build_task_augment(cfg.meta.task_augment, cfg.meta.task_augment_flip, bank, encoder, data.images,
                                 pool.rows, cfg.meta.train_block, device, cfg.run.precision, channels_last,
                                 cfg.meta.batch_size)
    if verbose:
        print(f"meta: encoder {source} ({'last block trained' if cfg.meta.train_block else 'frozen embeddings'}), "
              f"pool {pool.kind}: {len(pool)} images in {len(pool.class_counts())} classes"
              f"{'; ' + pool.note if pool.note else ''}; inputs {tuple(feats.shape)}"
              + (f"; task augmentation {cfg.meta.task_augment}" if augment is not None else ""))
    return MetaInputs(cfg, source, device, encoder, dim, pool, make_sampler(cfg, pool), bank, labeled,
                      data.class_ids[labeled], test, data.n_classes, truth, time.perf_counter() - t0, augment)


def new_method(name: str, inp: MetaInputs) -> MetaMethod:
    torch.manual_seed(inp.cfg.run.seed + zlib.crc32(name.encode()) % 10_000)  # order-independent init
    method = META_METHODS.get(name)(inp.cfg.meta, inp.body(), inp.device, inp.cfg.run.precision)
    method.setup()
    return method


def run_method(name: str, inp: MetaInputs, paths: RunPaths | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Meta-train one method and predict: (record, test probs (T, C), LOO probs (L, C))."""
    cfg, seed = inp.cfg, inp.cfg.run.seed
    ckpt = paths.checkpoint_dir("meta") / f"{name}.pt" if paths is not None else None
    log = paths.log("meta") if paths is not None else None
    lx, ly = inp.bank[inp.labeled], torch.as_tensor(inp.labeled_y, device=inp.device)
    bs = cfg.meta.batch_size
    t0 = time.perf_counter()
    with PeakMemory(inp.device) as mem:
        if inp.pool.kind == "labeled":
            def fit_predict(train, test):  # re-meta-train without the held-out image
                fold = new_method(name, inp)
                meta_train(fold, *inp.episodes(name, inp.pool.without_rows(inp.labeled[test])), seed, tag=name)
                return fold.predict(lx[train], ly[train], lx[test], inp.n_classes, bs)

            method = new_method(name, inp)
            info = meta_train(method, *inp.episodes(name), seed, ckpt, log, cfg.run.progress, tag=name)
        else:
            method = new_method(name, inp)
            info = meta_train(method, *inp.episodes(name), seed, ckpt, log, cfg.run.progress, tag=name)

            def fit_predict(train, test):  # adapt to the other labeled images only
                return method.predict(lx[train], ly[train], lx[test], inp.n_classes, bs)

        oof = leave_one_out(fit_predict, inp.labeled_y)
        probs = method.predict(lx, ly, inp.bank[inp.test], inp.n_classes, bs)
    record = {"loo": cv_summary(oof, inp.labeled_y), "test_accuracy": truth_accuracy(probs, inp.truth),
              "seconds": round(time.perf_counter() - t0, 2), "peak_memory_mb": round(mem.mb, 1),
              "train": info, "pool": inp.pool.kind, "encoder": inp.source,
              "task_augment": cfg.meta.task_augment if inp.augmented(name) else "none"}
    return record, probs.astype(np.float32), oof.astype(np.float32)


def format_table(rows: dict[str, dict], truth: bool, markdown: bool = False) -> str:
    """rows: name -> record with loo, test_accuracy, seconds, peak_memory_mb (and optional kind)."""
    header = ["method", "kind", "LOO acc [95% CI]"] + (["test acc (truth)"] if truth else []) + ["seconds", "peak MiB"]
    table = [header]
    for name, r in rows.items():
        loo = r["loo"]
        line = [name, r.get("kind", "meta"), f"{loo['accuracy']:.3f} [{loo['interval'][0]:.2f}, {loo['interval'][1]:.2f}]"]
        if truth:
            line.append("-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.4f}")
        line += [f"{r['seconds']:.1f}", f"{r['peak_memory_mb']:.0f}"]
        table.append(line)
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in table]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_and_save(name: str, inp: MetaInputs, paths: RunPaths) -> dict:
    """run_method + the head contract files and a summary.json; skips a method already written."""
    record_path = paths.head_dir(name, "meta") / "summary.json"
    if record_path.exists() and paths.head_probs(name, "meta").exists() and paths.head_oof(name, "meta").exists():
        print(f"  {name}: done earlier (resumed)")
        return io.read_json(record_path)
    record, probs, oof = run_method(name, inp, paths)
    io.write_npy(paths.head_probs(name, "meta"), probs)
    io.write_npy(paths.head_oof(name, "meta"), oof)
    io.write_json(record_path, record)
    io.append_jsonl(paths.log("meta"), {"method": name, "loo_accuracy": record["loo"]["accuracy"],
                                        "test_accuracy": record["test_accuracy"], "seconds": record["seconds"]})
    loo = record["loo"]
    print(f"  {name}: LOO {format_interval(loo['accuracy'], loo['interval'])}"
          + ("" if record["test_accuracy"] is None else f"  test {record['test_accuracy']:.4f}")
          + f"  ({record['seconds']:.1f}s, {record['peak_memory_mb']:.0f} MiB)", flush=True)
    return record


def run(cfg: Config, paths: RunPaths) -> dict:
    inp = prepare_inputs(cfg, paths)
    with cpu_threads(inp.device, cfg.meta.cpu_threads):
        results = {name: run_and_save(name, inp, paths) for name in cfg.meta.methods}
    summary = {"encoder": inp.source, "train_block": cfg.meta.train_block, "pool": inp.pool.kind,
               "pool_images": len(inp.pool), "pool_classes": len(inp.pool.class_counts()), "pool_note": inp.pool.note,
               "trunk_seconds": round(inp.trunk_seconds, 2), "truth": cfg.data.truth,
               "methods": {k: {"loo": v["loo"], "test_accuracy": v["test_accuracy"], "seconds": v["seconds"],
                               "peak_memory_mb": v["peak_memory_mb"]} for k, v in results.items()}}
    io.write_json(paths.stage("meta") / "summary.json", summary)
    print(format_table(results, truth=inp.truth is not None))
    return summary


STAGE = Stage(key="meta", title="meta-learning and pairwise methods", sections=("meta",), run=run,
              after=("prepare", "ssl"), optional_after=("pseudo", "metric"), validate=validate)
