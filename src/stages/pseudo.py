"""Stage 02: pseudo-labels for every unlabeled image (test included), over rounds.

    round 0:  labelers on the ssl embeddings -> combine/select -> round0/labels.csv
    round r:  self-train the latest encoder on the labeled + round r-1 selected images (skipped when
              pseudo.self_train_epochs == 0; pseudo.self_trainer: fixmatch, the whole encoder on the
              images, or tail, the stages after ssl.trunk_cut on 01_ssl's cached trunk maps)
              -> re-embed every image -> labelers
              (prototype/knn supports grow with round r-1's selection) -> round{r}/labels.csv

Files (paths.stage("pseudo")): round{r}/labels.csv (image_id,label,confidence,source,selected),
round{r}/embeddings.npy, round{r}/encoder.* + classifier.safetensors + train.json (trained rounds),
round{r}/summary.json, round{r}/_done.json; final labels.csv, encoder.*, embeddings.npy;
crossfit/folds.json + crossfit/fold{k}/labels.csv, embeddings.npy (pseudo.crossfit_folds: the rounds
again without fold k's labels, for 05_heads' leave-one-out; no embeddings when no round trained);
summary.csv + precision_coverage.png (precision needs cfg.data.truth: reporting only); log.jsonl.
An interrupted run restarts after the last finished round (and mid-round from the self-training
checkpoint). Under torchrun every process self-trains; rank 0 labels and writes.
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import torch

from src import io
from src.config import Config
from src.cv import label_folds
from src.data.competition import read_label_table
from src.data.dataset import CompetitionData, load_data
from src.errors import UserError
from src.models.encoder import embed, load_encoder, save_encoder
from src.models.split import embed_tail
from src.paths import RunPaths
from src.probe import truth_rows
from src.pseudo.labelers import LABELERS, LabelingContext, check_classes
from src.pseudo.report import (embedding_scores, format_summary, load_truth, plot_precision_coverage,
                               precision_at_coverage, summarize, summary_table)
from src.pseudo.selection import COMBINE, SELECTION, pseudo_label
from src.pseudo.selftrain import Classifier, make_head, self_train
from src.pseudo.tail import self_train_tail
from src.registry import Registry
from src.runtime import cpu_threads, resolve_device, use_channels_last
from src.ssl.trainer import replace_first_block
from src.stages import Stage
from src.train_utils import barrier, dist_info, local_device
from src.transductive import TransductiveContext, center_normalize, compute_prototypes

STAGE_KEY = "pseudo"
LEAVE_ONE_OUT = -1  # pseudo.crossfit_folds: every labeled image its own fold
EMBED_BATCH = 1024  # images per forward pass when embedding (memory only)
# name -> train_round(cfg, paths, data, r, emb, device): self-trains round r, saves its encoder and classifier
# in round{r}/ and returns the new (N, D) embeddings of every image (rank 0; other ranks: None)
SELF_TRAINERS = Registry("self_trainer")


def validate(cfg: Config) -> None:
    """Every pseudo setting that types alone cannot check; raises before any work starts."""
    p = cfg.pseudo
    if not p.labelers:
        raise UserError(f"pseudo.labelers: name at least one labeler (known: {', '.join(LABELERS.names())})")
    for name in p.labelers:
        if name not in LABELERS:
            raise UserError(f"pseudo.labelers: unknown labeler '{name}' (known: {', '.join(LABELERS.names())})")
    if len(set(p.labelers)) != len(p.labelers):
        raise UserError(f"pseudo.labelers: a labeler is listed twice ({p.labelers})")
    choices = {"combine": (p.combine, COMBINE), "selection": (p.selection, SELECTION),
               "classifier": (p.classifier, ("cosine", "linear"))}
    for key, (value, known) in choices.items():
        if value not in known:
            raise UserError(f"pseudo.{key}: unknown value '{value}' (known: {', '.join(known)})")
    if p.require_agreement < 1:  # capped at the number of labelers when applied
        raise UserError(f"pseudo.require_agreement: must be >= 1, got {p.require_agreement}")
    for key in ("threshold", "topk_fraction", "consistency_threshold", "ema", "scan_self_label_threshold"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise UserError(f"pseudo.{key}: must be in [0, 1], got {getattr(p, key)}")
    if not 0.0 < p.propagation_alpha < 1.0:
        raise UserError(f"pseudo.propagation_alpha: must be in (0, 1), got {p.propagation_alpha}")
    for key in ("knn_k", "kmeans_clusters", "kmeans_iters", "propagation_iters", "scan_heads", "scan_batch_size",
                "self_train_batch_size", "unlabeled_ratio", "temperature", "scan_lr", "self_train_lr",
                "classifier_temperature"):
        if getattr(p, key) <= 0:
            raise UserError(f"pseudo.{key}: must be positive, got {getattr(p, key)}")
    if p.crossfit_folds == 1 or p.crossfit_folds < LEAVE_ONE_OUT:
        raise UserError(f"pseudo.crossfit_folds: 0 (off), -1 (leave-one-out) or at least 2, got {p.crossfit_folds}")
    for key in ("rounds", "cpu_threads", "self_train_epochs", "tail_labeled_repeat", "scan_epochs", "scan_self_label_epochs", "scan_clusters",
                "prototype_refine_iters", "max_steps_per_epoch", "self_train_warmup_epochs",
                "self_train_weight_decay", "consistency_weight", "propagation_gamma", "scan_entropy_weight",
                "self_train_budget_s"):
        if getattr(p, key) < 0:
            raise UserError(f"pseudo.{key}: must be >= 0, got {getattr(p, key)}")
    if p.self_trainer not in SELF_TRAINERS:
        raise UserError(f"pseudo.self_trainer: unknown value '{p.self_trainer}' (known: {', '.join(SELF_TRAINERS)})")
    if p.self_trainer == "tail" and p.rounds > 0 and p.self_train_epochs > 0:
        if cfg.ssl.trunk_cut <= 0:
            raise UserError("pseudo.self_trainer: tail trains on 01_ssl's trunk maps; set ssl.trunk_cut (e.g. 6 for "
                            "EfficientNet-Lite)")
        if p.self_train_budget_s > 0:
            raise UserError("pseudo.self_train_budget_s: fits fixmatch rounds only; with self_trainer tail set "
                            "pseudo.self_train_epochs instead (and the budget to 0)")
    if p.self_train_batch_size % dist_info().world:
        raise UserError(f"pseudo.self_train_batch_size: {p.self_train_batch_size} is not divisible by the "
                        f"{dist_info().world} processes")


def validate_data(cfg: Config, data: CompetitionData) -> None:
    """Data-dependent checks: cluster counts vs classes, every class labeled, truth ids known."""
    p, n_classes = cfg.pseudo, data.n_classes
    if p.kmeans_clusters < n_classes and "kmeans" in p.labelers:
        raise UserError(f"pseudo.kmeans_clusters: {p.kmeans_clusters} is fewer than the {n_classes} classes")
    if 0 < p.scan_clusters < n_classes and "scan" in p.labelers:
        raise UserError(f"pseudo.scan_clusters: {p.scan_clusters} is fewer than the {n_classes} classes (0: classes)")
    check_classes(data.class_ids[data.labeled_idx], n_classes)
    fewest = int(np.bincount(data.class_ids[data.labeled_idx], minlength=n_classes).min())
    if p.crossfit_folds == LEAVE_ONE_OUT and fewest < 2:
        raise UserError(f"pseudo.crossfit_folds: -1 (leave-one-out), but a class has only {fewest} labeled image; "
                        "holding it out would leave the class unlabeled")
    if p.crossfit_folds > fewest:
        raise UserError(f"pseudo.crossfit_folds: {p.crossfit_folds} folds, but a class has only {fewest} labeled "
                        f"image(s); each fold must leave every class labeled (at most {fewest})")
    if cfg.data.truth:
        truth_rows(data, cfg.data.truth)  # unknown ids and classes without a labeled image: UserError now


# ---------------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------------
def labeler_input(cfg: Config, emb: np.ndarray, device: torch.device) -> TransductiveContext:
    """What the labelers see of `emb` (N, D): mean-centred and re-normalised with pseudo.center, with
    its kNN graph built on first use and kept (label rounds on the same embeddings share it)."""
    return TransductiveContext(center_normalize(emb) if cfg.pseudo.center else emb, device)


def label_round(cfg: Config, data: CompetitionData, emb: np.ndarray | TransductiveContext, device: torch.device,
                extra_idx: np.ndarray, extra_y: np.ndarray, truth: pd.DataFrame | None) -> tuple[pd.DataFrame, dict]:
    """Run every labeler on `emb` (N, D) or on a labeler_input of it, combine and select. Returns
    (labels table, info)."""
    graph = emb if isinstance(emb, TransductiveContext) else labeler_input(cfg, emb, device)
    ctx = LabelingContext(graph.x, data.labeled_idx, data.class_ids[data.labeled_idx], data.n_classes, cfg.pseudo,
                          device, cfg.run.seed, extra_idx, extra_y, cfg.run.progress, graph)
    unl = data.unlabeled_idx
    ids = data.index["image_id"].to_numpy()[unl]
    outputs, info = {}, {"labeler_seconds": {}, "labelers": {}}
    for name in cfg.pseudo.labelers:
        t0 = time.perf_counter()
        outputs[name] = LABELERS.get(name)(ctx)[unl]
        info["labeler_seconds"][name] = round(time.perf_counter() - t0, 2)
        if truth is not None:  # reporting only: how each labeler alone does on the truth images
            info["labelers"][name] = _labeler_vs_truth(ids, data.classes[outputs[name].argmax(1)],
                                                       outputs[name].max(1), truth)
    res = pseudo_label(outputs, cfg.pseudo)
    table = pd.DataFrame({"image_id": ids, "label": data.classes[res.label],
                          "confidence": np.round(res.confidence, 6), "source": res.source,
                          "selected": res.selected})
    return table, info


def _labeler_vs_truth(ids: np.ndarray, label: np.ndarray, conf: np.ndarray, truth: pd.DataFrame) -> dict:
    frame = pd.DataFrame({"image_id": ids, "label": label, "confidence": conf}).merge(truth, on="image_id",
                                                                                     suffixes=("", "_true"))
    correct = (frame["label"] == frame["label_true"]).to_numpy()
    curve = precision_at_coverage(frame["confidence"].to_numpy(), correct, (0.5, 0.8, 1.0))
    return {f"prec@{r.coverage:.1f}": round(r.precision, 4) for r in curve.itertuples()}


def _selected_support(paths: RunPaths, r: int, data: CompetitionData) -> tuple[np.ndarray, np.ndarray]:
    """(rows, class ids) of the images selected in round r's table."""
    table = read_label_table(paths.pseudo_labels(r))
    table = table[table["selected"].astype(bool)]
    row_of = {image_id: i for i, image_id in enumerate(data.index["image_id"].tolist())}
    return (np.array([row_of[i] for i in table["image_id"]], np.int64),
            data.encode(table["label"].tolist(), str(paths.pseudo_labels(r))))


def _latest_encoder(paths: RunPaths, r: int) -> tuple:
    """(weights, spec) of the newest encoder before round r: a trained round's, else ssl's."""
    for q in range(r - 1, 0, -1):
        weights = paths.pseudo_round(q) / "encoder.safetensors"
        if weights.exists():
            return weights, weights.with_suffix(".json")
    return paths.encoder("ssl"), paths.encoder_spec("ssl")


def _round_done(paths: RunPaths, r: int) -> bool:
    return (paths.pseudo_round(r) / "_done.json").exists()


@SELF_TRAINERS.register("fixmatch")
def train_round(cfg: Config, paths: RunPaths, data: CompetitionData, r: int, emb: np.ndarray,
                device: torch.device) -> np.ndarray | None:
    """Self-train the latest encoder on labeled + round r-1 selected images; rank 0 saves the EMA
    encoder + classifier and returns the new embeddings of every image (other ranks: None)."""
    rdir = paths.pseudo_round(r)
    extra_idx, extra_y = _selected_support(paths, r - 1, data)
    rows = np.concatenate([data.labeled_idx, extra_idx])
    y = np.concatenate([data.class_ids[data.labeled_idx], extra_y])
    encoder = load_encoder(*_latest_encoder(paths, r), device="cpu")
    protos = compute_prototypes(emb[rows], y, data.n_classes)  # cosine head starts at the prototypes
    model = Classifier(encoder, make_head(cfg.pseudo.classifier, encoder.dim, data.n_classes,
                                          cfg.pseudo.classifier_temperature, protos))
    ema, log = self_train(cfg, model, data.images, rows, y, data.unlabeled_idx, device, rdir / "ckpt",
                          paths.log(STAGE_KEY), r)
    if not dist_info().is_main:  # rank 0 embeds and writes; the others read its files after a barrier
        return None
    save_encoder(ema.encoder, rdir / "encoder.safetensors", rdir / "encoder.json",
                 extra={"stage": STAGE_KEY, "round": r})
    io.save_tensors(rdir / "classifier.safetensors", ema.head.state_dict(),
                    metadata={"kind": cfg.pseudo.classifier, "temperature": str(cfg.pseudo.classifier_temperature)})
    io.write_json(rdir / "train.json", {"train_images": int(len(rows)), "log": log})
    channels_last = use_channels_last(cfg.run.channels_last, device, ema.encoder)
    return embed(ema.encoder, data.images, device, EMBED_BATCH, cfg.run.precision, channels_last=channels_last,
                 progress=cfg.run.progress, power=cfg.ssl.embed_power)


@SELF_TRAINERS.register("tail")
def train_tail_round(cfg: Config, paths: RunPaths, data: CompetitionData, r: int, emb: np.ndarray,
                     device: torch.device) -> np.ndarray | None:
    """Train the tail of the latest encoder (src/pseudo/tail.py) on 01_ssl's trunk maps of the labeled
    + round r-1 selected images (rank 0 only); save the whole encoder + classifier and return the new
    embeddings: the main block through the trained tail, the extra encoders' blocks as 01_ssl wrote them."""
    if not dist_info().is_main:
        return None
    rdir, trunk = paths.pseudo_round(r), paths.trunk_maps("ssl")
    if not trunk.with_suffix(".json").exists():
        raise UserError(f"{trunk}: not found (run pipelines/01_ssl.py with ssl.trunk_cut > 0)")
    spec = io.read_json(trunk.with_suffix(".json"))
    cut, dim, blocks = int(spec["cut"]), int(spec["dim"]), int(spec["blocks"])
    maps = io.read_npy(trunk)  # (N, V, C, s, s) float16, in memory: batches index random rows
    if len(maps) != len(emb) or emb.shape[1] < dim:
        raise UserError(f"{trunk}: {len(maps)} images and a {dim}-d main block, but the embeddings are "
                        f"{tuple(emb.shape)} (run 01_ssl again)")
    extra_idx, extra_y = _selected_support(paths, r - 1, data)
    rows = np.concatenate([data.labeled_idx, extra_idx])
    y = np.concatenate([data.class_ids[data.labeled_idx], extra_y])
    encoder = load_encoder(*_latest_encoder(paths, r), device="cpu")
    protos = compute_prototypes(emb[rows, :dim], y, data.n_classes)  # (K, D_main): the classifier starts there
    classifier, log = self_train_tail(cfg.pseudo, encoder.net, cut, maps, rows, y, data.labeled_idx, protos, device,
                                      cfg.run.seed + r, cfg.run.progress,
                                      lambda _, record: io.append_jsonl(paths.log(STAGE_KEY), {"round": r, **record}))
    encoder.cpu()
    save_encoder(encoder, rdir / "encoder.safetensors", rdir / "encoder.json",
                 extra={"stage": STAGE_KEY, "round": r, "trained": f"tail after stage {cut}"})
    io.save_tensors(rdir / "classifier.safetensors", classifier.state_dict(),
                    metadata={"kind": "cosine", "temperature": str(cfg.pseudo.classifier_temperature)})
    io.write_json(rdir / "train.json", {"train_images": int(len(rows)), "log": log})
    main = embed_tail(encoder.net, maps, cut, cfg.ssl.embed_power, device=device)  # (N, D_main), unit rows
    return replace_first_block(emb, main, blocks)  # 01_ssl's concatenation with the new main block


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def run(cfg: Config, paths: RunPaths) -> dict:
    device = local_device(resolve_device(cfg.run.device))
    with cpu_threads(device, cfg.pseudo.cpu_threads):
        return _run(cfg, paths, device)


def _run(cfg: Config, paths: RunPaths, device: torch.device) -> dict:
    info = dist_info()
    barrier()
    data = load_data(paths)
    validate_data(cfg, data)
    for f in (paths.embeddings("ssl"), paths.encoder("ssl")):
        if not f.exists():
            raise UserError(f"{f}: not found (run pipelines/01_ssl.py first)")
    emb = io.read_npy(paths.embeddings("ssl")).astype(np.float32)
    first = labeler_input(cfg, emb, device)  # round 0 of the rounds and of every cross-fit fold: one kNN graph
    summaries = run_rounds(cfg, paths, data, emb, device, load_truth(cfg.data.truth), first=first)
    out = finish(cfg, paths, summaries) if info.is_main else {}
    folds = crossfit(cfg, paths, data, emb, device, first)
    return out | ({"crossfit": folds} if folds else {})


def run_rounds(cfg: Config, paths: RunPaths, data: CompetitionData, emb: np.ndarray, device: torch.device,
               truth: pd.DataFrame | None, name: str = "round",
               first: TransductiveContext | None = None, copy_untrained: bool = True) -> dict[int, dict]:
    """Rounds 0..pseudo.rounds from the ssl embeddings `emb` (N, D) into paths.pseudo_round(r); a round
    finished earlier is read back. truth: reporting only (None: no truth columns). first: round 0's
    labeler_input of `emb`, shared with other calls. copy_untrained: write a round's embeddings when it
    trained nothing (a copy of its input). Returns the summaries."""
    info, p = dist_info(), cfg.pseudo
    summaries: dict[int, dict] = {}
    for r in range(p.rounds + 1):
        rdir = paths.pseudo_round(r)
        if _round_done(paths, r):
            summaries[r] = io.read_json(rdir / "summary.json")
            if (rdir / "embeddings.npy").exists():  # else the round trained nothing: its input
                emb = io.read_npy(rdir / "embeddings.npy").astype(np.float32)
            if info.is_main:
                print(f"{name} {r}: done earlier (resuming after it)")
            continue
        t0 = time.perf_counter()
        trained = r > 0 and p.self_train_epochs > 0
        if trained:
            emb = SELF_TRAINERS.get(p.self_trainer)(cfg, paths, data, r, emb, device)
        t_train = time.perf_counter() - t0
        if info.is_main:
            extra = _selected_support(paths, r - 1, data) if r > 0 else (np.zeros(0, np.int64),) * 2
            table, linfo = label_round(cfg, data, first if r == 0 and first is not None else emb, device, *extra, truth)
            if trained or copy_untrained:
                io.write_npy(rdir / "embeddings.npy", emb.astype(np.float16))
            io.write_csv(paths.pseudo_labels(r), table)
            s = summarize(table, data.classes, truth) | linfo
            s |= embedding_scores(data, emb, cfg.data.truth if truth is not None else "", cfg.run.seed)
            s |= {"round": r, "trained": trained, "train_seconds": round(t_train, 2),
                  "seconds": round(time.perf_counter() - t0, 2)}
            if trained:
                s["self_train"] = io.read_json(rdir / "train.json")["log"][-1]
            io.write_json(rdir / "summary.json", s)
            shutil.rmtree(rdir / "ckpt", ignore_errors=True)  # the round's encoder is saved; free the disk
            io.write_json(rdir / "_done.json", {"round": r})
            summaries[r] = s
            print(format_summary(r, s) if name == "round" else f"{name} {r}: {s['n_selected']} selected "
                  f"({s['seconds']:.1f}s)")
            _note_cv_drop(summaries, r)
        barrier()
        if not info.is_main and (rdir / "embeddings.npy").exists():
            emb = io.read_npy(rdir / "embeddings.npy").astype(np.float32)
    return summaries


def crossfit(cfg: Config, paths: RunPaths, data: CompetitionData, emb: np.ndarray, device: torch.device,
             first: TransductiveContext | None = None) -> dict:
    """pseudo.crossfit_folds: the rounds again once per fold of the labeled images, without that fold's
    labels (they join the unlabeled images). Writes crossfit/folds.json (the fold of every labeled
    image) first, then per fold crossfit/fold{k}/labels.csv, embeddings.npy (float16; only when a round
    trained) and _done.json;
    05_heads predicts each held-out image from its fold's files. A fold finished earlier is kept (the
    runner clears the stage directory when the config or the data change)."""
    info = dist_info()
    if not cfg.pseudo.crossfit_folds:
        return {}
    fold, spec = crossfit_spec(data, cfg.pseudo.crossfit_folds)
    n_folds, t_all = spec["folds"], time.perf_counter()
    if info.is_main:
        io.write_json(paths.crossfit / "folds.json", spec)
    barrier()
    out = {}
    for k in range(n_folds):
        fp = paths.crossfit_fold(k)
        if not fp.done_marker(STAGE_KEY).exists():
            t0 = time.perf_counter()
            summaries = run_rounds(cfg, fp, data.without_labels(data.labeled_idx[fold == k]), emb, device, None,
                                   f"fold {k} round", first, copy_untrained=False)
            if info.is_main:
                last_round = max(summaries)
                last = fp.pseudo_round(last_round)
                # untrained rounds leave the embeddings as they were: 05_heads reads its own then
                trained = any(s["trained"] for s in summaries.values())
                shutil.move(last / "labels.csv", fp.pseudo_labels())
                if trained:
                    shutil.move(last / "embeddings.npy", fp.embeddings(STAGE_KEY))
                for r in summaries:  # the rounds' encoders and embeddings: not needed past the fold
                    shutil.rmtree(fp.pseudo_round(r), ignore_errors=True)
                io.write_json(fp.done_marker(STAGE_KEY), {
                    "fold": k, "held_out": int((fold == k).sum()), "trained": trained,
                    "n_selected": summaries[last_round]["n_selected"], "seconds": round(time.perf_counter() - t0, 2)})
            barrier()
        out[str(k)] = io.read_json(fp.done_marker(STAGE_KEY))
        if info.is_main and n_folds <= 10:
            print(f"cross-fit fold {k}: {out[str(k)]['held_out']} labels held out, "
                  f"{out[str(k)]['n_selected']} pseudo-labels ({out[str(k)]['seconds']:.1f}s)")
    if info.is_main:
        print(f"cross-fit: {n_folds} folds{' (leave-one-out)' if spec['leave_one_out'] else ''} in "
              f"{time.perf_counter() - t_all:.1f}s")
    return out


def crossfit_spec(data: CompetitionData, n_folds: int) -> tuple[np.ndarray, dict]:
    """(fold (L,) of each labeled row, crossfit/folds.json's content: the fold of each labeled image id).
    n_folds LEAVE_ONE_OUT: labeled row i is fold i."""
    y = data.class_ids[data.labeled_idx]
    loo = n_folds == LEAVE_ONE_OUT
    fold = np.arange(len(y), dtype=np.int64) if loo else label_folds(y, n_folds)
    ids = data.index["image_id"].to_numpy()[data.labeled_idx]
    return fold, {"folds": len(y) if loo else n_folds, "leave_one_out": loo,
                  "fold_of": {str(i): int(f) for i, f in zip(ids, fold)}}


def _note_cv_drop(summaries: dict[int, dict], r: int) -> None:
    if r > 0 and summaries[r]["knn_loo_labeled"] < summaries[r - 1]["knn_loo_labeled"]:
        print(f"  note: round {r} lowered the labeled leave-one-out kNN score "
              f"{summaries[r - 1]['knn_loo_labeled']:.4f} -> {summaries[r]['knn_loo_labeled']:.4f}")


def finish(cfg: Config, paths: RunPaths, summaries: dict[int, dict]) -> dict:
    """Final table, encoder and embeddings (the last round's), the per-round table and plot."""
    last = max(summaries)
    with io.atomic_path(paths.pseudo_labels(), suffix=".csv") as tmp:
        shutil.copyfile(paths.pseudo_labels(last), tmp)
    io.write_npy(paths.embeddings(STAGE_KEY), io.read_npy(paths.pseudo_round(last) / "embeddings.npy"))
    weights, spec = _latest_encoder(paths, last + 1)
    save_encoder(load_encoder(weights, spec), paths.encoder(STAGE_KEY), paths.encoder_spec(STAGE_KEY),
                 extra={"stage": STAGE_KEY, "from": str(weights)})
    table = summary_table(summaries)
    io.write_csv(paths.stage(STAGE_KEY) / "summary.csv", table)
    plot = plot_precision_coverage(summaries, paths.plot(STAGE_KEY, "precision_coverage"))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False))
    if plot:
        print(f"precision vs coverage plot: {plot}")
    out = {"rounds": {str(r): {k: s[k] for k in ("n_selected", "coverage", "knn_loo_labeled", "seconds")}
                      | ({"selected_precision": round(s["truth"]["selected_precision"], 4),
                          "accuracy_all": round(s["truth"]["accuracy_all"], 4),
                          "prec@0.8": s["truth"]["precision_at_coverage"]["0.8"]} if "truth" in s else {})
                      for r, s in summaries.items()}}
    return out


STAGE = Stage(key=STAGE_KEY, title="pseudo-labels: label, select, self-train (rounds)",
              sections=("data", "pseudo"), run=run, after=("ssl",), validate=validate)
