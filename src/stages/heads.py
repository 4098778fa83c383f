"""Stage 05: few-shot inference heads on the latest embeddings, with local CV.

For every head in ``heads.heads`` it writes the head contract (``paths.head_probs``: test
probabilities; ``paths.head_oof``: leave-one-out probabilities of the labeled images), the
group-fold out-of-fold probabilities the stacker trains on (``paths.head_stack_oof``), and a CV
record; ``paths.cv_report`` gathers them: LOO accuracy with a Wilson interval, support re-draws,
the (biased) episodic estimate, and the public-truth accuracy beside them when configured.

Near-duplicates: the embeddings are searched for near-duplicate pairs (``dedup.embedding``,
reported in ``near_duplicates.json``). With ``dedup.test_support`` a test image that is a
near-duplicate (hash pairs of 00_prepare and embedding pairs) of a labeled image joins that image's
class as support in every head, tied to it like its pseudo-labels (dropped when it is held out).

Pseudo-labels and leakage: the pseudo-labels were made with all labeled images, so a held-out
image's label echoes through the pseudo-labels it shaped. Each pseudo-labeled image therefore
belongs to the *group* of the nearest labeled image of its pseudo-class (the one it most likely
inherited its label from), and a fit uses a pseudo-labeled image only when that labeled image is
in its support (LOO drops the held-out image's group, a re-draw keeps the groups of its support,
stacker folds are group folds). This removes the direct echo, not all of it: the pseudo-labeler's
global choices saw every label, so LOO with pseudo-labeled support is optimistic when the
pseudo-labels are poor. Heads that use them therefore also report ``loo_labeled_only`` (the same
head on the labeled images alone), an honest reference for the head without its pseudo-labels.

Transductive heads with ``uses_context`` (src/heads/transductive.py) share one
:class:`src.transductive.TransductiveContext` over every image: features and the kNN graph are
built once, every fit (final, LOO, re-draws, stacker folds, episodes) passes row indices and only
changes the support (label propagation: the seeds).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from src import io
from src.config import Config
from src.cv import (cv_summary, episodic_estimate, format_cv_table, format_interval, leave_one_out, public_truth,
                    support_redraws, truth_accuracy)
from src.data import CompetitionData, load_data, near_duplicates
from src.data.competition import read_label_table
from src.ensemble import check_folds, group_folds, group_oof
from src.errors import UserError
from src.estimate import EstimateContext, check_estimator, estimate_all
from src.heads import HEADS, l2_normalize, loads_saved_encoder
from src.paths import ENCODER_STAGES, RunPaths
from src.runtime import resolve_device
from src.stages import Stage
from src.transductive import TransductiveContext


def embedding_stage(cfg: Config, paths: RunPaths) -> str:
    """Which stage's embeddings the heads read: heads.embeddings, or the latest that exists."""
    choice = cfg.heads.embeddings
    if choice == "auto":
        for stage in ENCODER_STAGES:
            if paths.done_marker(stage).exists() and paths.embeddings(stage).exists():
                return stage
        raise UserError(f"{paths.embeddings('ssl')}: no embeddings found (run 01_ssl first)")
    if choice not in ENCODER_STAGES:
        raise UserError(f"heads.embeddings: expected auto, ssl, pseudo or metric, got '{choice}'")
    if not paths.embeddings(choice).exists():
        raise UserError(f"{paths.embeddings(choice)}: heads.embeddings={choice} but that stage wrote no embeddings")
    return choice


def read_pseudo_labels(paths: RunPaths, data: CompetitionData, min_confidence: float = 0.0) -> pd.DataFrame | None:
    """Selected pseudo-labels as DataFrame(row, y (class id), confidence), most confident first;
    None when the pseudo stage has not run."""
    path = paths.pseudo_labels()
    if not (paths.done_marker("pseudo").exists() and path.exists()):
        return None
    return pseudo_rows(read_label_table(path, ("image_id", "label", "confidence", "selected")), data,
                       min_confidence, path)


def pseudo_rows(frame: pd.DataFrame, data: CompetitionData, min_confidence: float = 0.0,
                path="pseudo-labels") -> pd.DataFrame:
    """A 02_pseudo label table (image_id, label, confidence, selected) -> the selected rows as
    DataFrame(row, y (class id), confidence), most confident first, never a labeled row."""
    missing = {"image_id", "label", "confidence", "selected"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    selected = frame["selected"]
    if selected.dtype != bool:
        selected = selected.astype(str).str.strip().str.lower().isin(["true", "1"])
    frame = frame[selected & (frame["confidence"] >= min_confidence)]
    row_of = {image_id: r for r, image_id in enumerate(data.index["image_id"])}
    rows = frame["image_id"].map(row_of)
    if rows.isna().any():
        raise UserError(f"{path}: row image_id '{frame['image_id'][rows.isna()].iloc[0]}' matches no image")
    ys = data.encode(frame["label"].tolist(), str(path))
    out = pd.DataFrame({"row": rows.to_numpy(np.int64), "y": ys,
                        "confidence": frame["confidence"].to_numpy(np.float32)})
    out = out[data.class_ids[out["row"]] < 0]  # never override a real label
    return out.sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)


def cap_per_class(frame: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The `cap` most confident rows of each class (frame sorted by confidence); cap 0: all."""
    return frame if cap <= 0 else frame.groupby("y", sort=False).head(cap).reset_index(drop=True)


@dataclass
class HeadInputs:
    """Everything a head's fits draw from. Rows are rows of the prepared index."""

    x: np.ndarray  # (N, D) float32 embeddings, L2-normalised
    images: np.ndarray  # (N, H, W, 3) uint8 memmap (heads that run the encoder)
    n_classes: int
    labeled: np.ndarray  # (L,) rows with a real label
    labeled_y: np.ndarray  # (L,) class ids
    test: np.ndarray  # (T,) test rows
    pseudo: np.ndarray  # (P,) pseudo-labeled rows used as support (capped per class)
    pseudo_y: np.ndarray
    pseudo_w: np.ndarray  # confidence
    pseudo_group: np.ndarray  # (P,) index 0..L-1 of the labeled row it inherited its label from; -1: none
    dup: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (U,) test rows: near-duplicate support
    dup_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (U,) class of the labeled twin
    dup_group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (U,) index 0..L-1 of that twin
    context: TransductiveContext | None = None  # every image's embedding, for heads with uses_context

    def inputs(self, head, rows: np.ndarray) -> np.ndarray:
        if getattr(head, "takes_rows", False):  # the head reads its context's features (and kNN graph) itself
            return rows
        return np.asarray(self.images[rows]) if head.runs_encoder else self.x[rows]


def inherited_from(x: np.ndarray, rows: np.ndarray, row_y: np.ndarray, labeled: np.ndarray,
                   labeled_y: np.ndarray) -> np.ndarray:
    """Group of each pseudo-labeled row: index 0..L-1 of the nearest (cosine) labeled image *of its
    pseudo-class*, the labeled image its label most likely came from."""
    out = np.empty(len(rows), np.int64)
    other = row_y[:, None] != labeled_y[None, :]  # (P, L)
    for s in range(0, len(rows), 8192):
        sims = x[rows[s:s + 8192]] @ x[labeled].T
        sims[other[s:s + 8192]] = -np.inf
        out[s:s + 8192] = sims.argmax(1)
    return out


def make_head(name: str, cfg: Config, encoder, device, context: TransductiveContext | None = None):
    """A fresh head; heads with uses_context get `context` (the embeddings and kNN graph of every
    image, shared by all their fits) and then take row indices."""
    cls = HEADS.get(name)
    if name == "cosine_finetune" and encoder is not None:
        return cls(cfg.heads, encoder=encoder, device=device, precision=cfg.run.precision, seed=cfg.run.seed)
    if name == "cosine_finetune":
        return cls(cfg.heads, device=device, seed=cfg.run.seed)
    head = cls(cfg.heads)
    if head.uses_context:
        head.context = context
    return head


def fit_predict_fn(name: str, cfg: Config, h: HeadInputs, encoder, device, use_pseudo: bool,
                   sup_rows: np.ndarray, sup_y: np.ndarray, sup_w: np.ndarray, sup_group: np.ndarray,
                   extra_query: np.ndarray, use_dup: bool = True):
    """fit_predict(train, test) over a table of rows (sup_rows[i] with label sup_y[i], group
    sup_group[i]). The support is the train rows plus, with use_pseudo, every pseudo-labeled row
    whose group is among the train rows' groups (and, with use_dup, every near-duplicate test row
    of such a group). Transductive heads see the test rows and `extra_query` (the test images) as
    their unlabeled query set."""

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        head = make_head(name, cfg, encoder, device, h.context)
        rows, ys, ws = sup_rows[train], sup_y[train], sup_w[train]
        tied = [(h.pseudo, h.pseudo_y, h.pseudo_w, h.pseudo_group)] if use_pseudo else []
        if use_dup:
            tied.append((h.dup, h.dup_y, np.ones(len(h.dup), np.float32), h.dup_group))
        for t_rows, t_y, t_w, t_group in tied:
            keep = np.isin(t_group, sup_group[train]) | (t_group < 0)  # group -1: tied to no label
            keep &= ~np.isin(t_rows, sup_rows[test])  # a row is never its own support
            rows = np.concatenate([rows, t_rows[keep]])
            ys, ws = np.concatenate([ys, t_y[keep]]), np.concatenate([ws, t_w[keep]])
        query = None
        if head.transductive:
            query = h.inputs(head, np.concatenate([extra_query, sup_rows[test]]))
        head.fit(h.inputs(head, rows), ys, h.n_classes, query_x=query, support_weight=ws)
        return head.predict_proba(h.inputs(head, sup_rows[test]))

    return fit_predict


def stack_rows(cfg: Config, h: HeadInputs, pool: pd.DataFrame | None, x: np.ndarray) -> pd.DataFrame:
    """The stacker's table: every labeled row (group = itself) plus a class-balanced sample of
    pseudo-labeled rows (group = the labeled image each inherited from), with group folds."""
    labeled = pd.DataFrame({"row": h.labeled, "y": h.labeled_y, "weight": 1.0,
                            "group": np.arange(len(h.labeled)), "labeled": True})
    parts = [labeled]
    if pool is not None and len(pool) and cfg.cv.stack_max_pseudo > 0:
        per_class = max(1, cfg.cv.stack_max_pseudo // h.n_classes)
        sample = pool.sample(frac=1.0, random_state=cfg.run.seed).groupby("y", sort=False).head(per_class)
        parts.append(pd.DataFrame({"row": sample["row"].to_numpy(), "y": sample["y"].to_numpy(),
                                   "weight": sample["confidence"].to_numpy(),
                                   "group": inherited_from(x, sample["row"].to_numpy(), sample["y"].to_numpy(),
                                                           h.labeled, h.labeled_y),
                                   "labeled": False}))
    table = pd.concat(parts, ignore_index=True)
    table["fold"] = group_folds(table["group"].to_numpy(), cfg.cv.stack_folds, cfg.run.seed)
    check_folds(table["group"].to_numpy(), table["fold"].to_numpy())
    return table


def head_inputs(cfg: Config, data: CompetitionData, x: np.ndarray, pool: pd.DataFrame | None,
                device=None, context: TransductiveContext | None = None, tie_pseudo: bool = True) -> HeadInputs:
    """The heads' inputs: embeddings x (N, D), the labeled rows of `data`, (with heads.use_pseudo)
    the pseudo-labels of `pool` capped per class, each in the group of the labeled image it inherited
    from (tie_pseudo=False: group -1, tied to no label), and the transductive heads' context over every image (`context`, else a new one over x).
    No near-duplicate support (run() adds it)."""
    labeled = data.labeled_idx
    h = HeadInputs(x=x, images=data.images, n_classes=data.n_classes, labeled=labeled,
                   labeled_y=data.class_ids[labeled], test=data.test_idx,
                   pseudo=np.zeros(0, np.int64), pseudo_y=np.zeros(0, np.int64), pseudo_w=np.zeros(0, np.float32),
                   pseudo_group=np.zeros(0, np.int64),
                   context=context if context is not None else TransductiveContext(x, device))
    support = cap_per_class(pool, cfg.heads.pseudo_max_per_class) if pool is not None and cfg.heads.use_pseudo else None
    if support is not None and len(support):
        h.pseudo, h.pseudo_y = support["row"].to_numpy(), support["y"].to_numpy()
        h.pseudo_w = support["confidence"].to_numpy(np.float32)
        h.pseudo_group = (inherited_from(x, h.pseudo, h.pseudo_y, labeled, h.labeled_y) if tie_pseudo
                          else np.full(len(h.pseudo), -1, np.int64))
    return h


@dataclass
class CrossFold:
    """One fold of 02_pseudo's cross-fitting: the labeled rows it held out and the heads' inputs
    made without their labels."""

    held: np.ndarray  # (H,) positions 0..L-1 of the held-out labeled rows
    inputs: HeadInputs  # the fold's embeddings (when the heads read 02_pseudo's) and pseudo-labels


def crossfit_folds(cfg: Config, paths: RunPaths, data: CompetitionData, source: str, h: HeadInputs,
                   device=None) -> list[CrossFold]:
    """02_pseudo's cross-fitted folds (pseudo.crossfit_folds) as head inputs; [] when it wrote none.
    The embeddings are the fold's when the heads read 02_pseudo's, else the heads' own."""
    spec_file = paths.crossfit / "folds.json"
    if not (paths.done_marker("pseudo").exists() and spec_file.exists()):
        return []
    spec = io.read_json(spec_file)
    ids = [str(i) for i in data.index["image_id"].to_numpy()[h.labeled]]
    fold_of = spec.get("fold_of", {})
    if sorted(fold_of) != sorted(ids):
        raise UserError(f"{spec_file}: its labeled images are not this run's (run 02_pseudo again)")
    fold = np.array([fold_of[i] for i in ids], np.int64)
    out = []
    for k in range(int(spec["folds"])):
        fp = paths.crossfit_fold(k)
        if not fp.done_marker("pseudo").exists():
            raise UserError(f"{fp.done_marker('pseudo')}: not found: cross-fit fold {k} did not finish "
                            "(run 02_pseudo again)")
        x, context = h.x, h.context
        # a fold whose rounds trained nothing wrote no embeddings: they are the heads' own
        if source == "pseudo" and io.read_json(fp.done_marker("pseudo")).get("trained", True):
            emb = io.read_npy(fp.embeddings("pseudo"))
            if emb.shape != h.x.shape:
                raise UserError(f"{fp.embeddings('pseudo')}: shape {emb.shape}, expected {h.x.shape}")
            x, context = l2_normalize(np.asarray(emb, np.float32)), None
        out.append(crossfold(cfg, data, np.flatnonzero(fold == k), x, context,
                             read_pseudo_labels(fp, data, cfg.heads.pseudo_min_confidence), h, device))
    return out


def crossfold(cfg: Config, data: CompetitionData, held: np.ndarray, x: np.ndarray, context, pseudo: pd.DataFrame,
              h: HeadInputs, device=None) -> CrossFold:
    """One cross-fit fold as head inputs: `pseudo` (row, y, confidence) was made without the labels of
    the labeled rows at positions `held`. Those pseudo-labels never saw the held-out labels: no echo to
    cut, so they stay in every fit (tying them to their nearest labeled image would drop a held-out
    image's true neighbours). Near-duplicates are the run's (`h`)."""
    inputs = head_inputs(cfg, data, x, pseudo, device, context, tie_pseudo=False)
    inputs.dup, inputs.dup_y, inputs.dup_group = h.dup, h.dup_y, h.dup_group
    return CrossFold(held, inputs)


def crossfit_oof(name: str, cfg: Config, folds: list[CrossFold], use_pseudo: bool, encoder=None,
                 device=None) -> np.ndarray:
    """(L, C) cross-fitted leave-one-out probabilities: each labeled row predicted by the head fit on
    every other labeled row (plus, with use_pseudo, all its fold's pseudo-labels: they are tied to no
    label) on the embeddings of the fold that never saw its label."""
    out = 0.0
    for f in folds:
        h = f.inputs
        fit_predict = fit_predict_fn(name, cfg, h, encoder, device, use_pseudo, h.labeled, h.labeled_y,
                                     np.ones(len(h.labeled), np.float32), np.arange(len(h.labeled)), h.test)
        out = out + leave_one_out(fit_predict, h.labeled_y, f.held)  # zero outside the fold's rows
    return np.asarray(out, np.float32)


def head_outputs(name: str, cfg: Config, h: HeadInputs, table: pd.DataFrame | None, encoder=None,
                 device=None, folds: list[CrossFold] = ()) -> dict:
    """One head's contract arrays: "probs" (T, C) on the test rows (fit on every labeled row, plus
    the pseudo-labeled support), "oof" (L, C) leave-one-out over the labeled rows (cross-fitted over
    `folds` when given), "stack" (R, C) group-fold OOF over `table`'s rows (None without a table);
    plus "labeled_fp" (the fit_predict over the labeled rows, for re-draws) and "runs_encoder"."""
    use_pseudo = cfg.heads.use_pseudo and name in cfg.heads.pseudo_heads
    ones = np.ones(len(h.labeled), np.float32)

    def over(rows, ys, ws, grp):
        return fit_predict_fn(name, cfg, h, encoder, device, use_pseudo, rows, ys, ws, grp, h.test)

    labeled_fp = over(h.labeled, h.labeled_y, ones, np.arange(len(h.labeled)))
    # Final model: every labeled row (and all pseudo support); test rows are the query set.
    head = make_head(name, cfg, encoder, device, h.context)
    probs = _predict_test(h, head, use_pseudo)
    oof = (crossfit_oof(name, cfg, list(folds), use_pseudo, encoder, device) if folds
           else leave_one_out(labeled_fp, h.labeled_y))
    stack = None
    if table is not None:
        stack = group_oof(over(table["row"].to_numpy(), table["y"].to_numpy(), table["weight"].to_numpy(np.float32),
                               table["group"].to_numpy()), table["fold"].to_numpy())
    return {"probs": probs, "oof": oof, "stack": stack, "labeled_fp": labeled_fp, "runs_encoder": head.runs_encoder,
            "use_pseudo": use_pseudo}


def validate(cfg: Config) -> None:
    check_estimator(cfg.cv.estimator)  # the estimate column of the CV table
    for name in cfg.heads.heads:
        HEADS.get(name)  # unknown head -> UserError listing the known ones
    if not cfg.heads.heads:
        raise UserError("heads.heads: empty list (name at least one head)")
    if cfg.heads.distance not in ("cosine", "euclidean"):
        raise UserError(f"heads.distance: expected cosine or euclidean, got '{cfg.heads.distance}'")
    bad = [p for p in cfg.heads.pseudo_heads if p not in HEADS]
    if bad:
        raise UserError(f"heads.pseudo_heads: unknown head '{bad[0]}' (known: {', '.join(HEADS.names())})")
    if cfg.heads.knn_k < 1:
        raise UserError(f"heads.knn_k: must be >= 1, got {cfg.heads.knn_k}")
    if any(k < 1 for k in cfg.cv.shots):
        raise UserError(f"cv.shots: every shot count must be >= 1, got {cfg.cv.shots}")
    if cfg.cv.stack_folds < 2:
        raise UserError(f"cv.stack_folds: must be >= 2, got {cfg.cv.stack_folds}")


def run(cfg: Config, paths: RunPaths) -> dict:
    data = load_data(paths)
    source = embedding_stage(cfg, paths)
    emb = io.read_npy(paths.embeddings(source))
    if emb.ndim != 2 or len(emb) != len(data.index):
        raise UserError(f"{paths.embeddings(source)}: shape {emb.shape}, expected ({len(data.index)}, D)")
    x = l2_normalize(np.asarray(emb, np.float32))
    truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
    device = resolve_device(cfg.run.device)
    encoder = None
    if loads_saved_encoder(cfg.heads):
        from src.models.encoder import load_encoder

        encoder = load_encoder(paths.encoder(source), paths.encoder_spec(source), device)

    # Pseudo-labels feed the episodes and the stacker's rows always, the heads' supports only with use_pseudo.
    pool = read_pseudo_labels(paths, data, cfg.heads.pseudo_min_confidence)
    h = head_inputs(cfg, data, x, pool, device)
    labeled = h.labeled
    near = near_duplicate_pass(cfg, paths, data, x, device)
    if cfg.dedup.test_support:
        h.dup, h.dup_y, h.dup_group = near_duplicate_support(cfg, paths, data, near)
    table = stack_rows(cfg, h, pool, x)
    io.write_csv(paths.stack_table, table)
    folds = crossfit_folds(cfg, paths, data, source, h, device)
    # Episodes draw from confident pseudo-labels (biased by the pseudo-labeler by construction).
    episode_pool = None if pool is None else pool[pool["confidence"] >= cfg.cv.episode_min_confidence]

    print(f"embeddings: {source} {x.shape}; labeled {len(labeled)}; pseudo-labeled support {len(h.pseudo)}"
          f"{'' if pool is not None else ' (no pseudo-labels)'}; stacker rows {len(table)}"
          + (f"; near-duplicate test support {len(h.dup)}" if cfg.dedup.test_support else "")
          + (f"; LOO cross-fitted over {len(folds)} folds of 02_pseudo" if folds else ""))
    results = {}
    # Thousands of tiny fits: one BLAS/OpenMP thread each (threads only contend at this size).
    with threadpool_limits(1):
        for name in tqdm(cfg.heads.heads, desc="heads", disable=not cfg.run.progress):
            results[name] = run_head(name, cfg, paths, h, table, episode_pool, truth, encoder, device, folds)
    # Accuracy estimates of every head from the test images and the labels together (src/estimate.py).
    ctx = EstimateContext([np.asarray(io.read_npy(paths.head_probs(n)), np.float64) for n in results],
                          [np.asarray(io.read_npy(paths.head_oof(n)), np.float64) for n in results], h.labeled_y)
    for k, name in enumerate(results):
        results[name] = {**results[name], "estimates": estimate_all(ctx.probs[k], ctx.oof[k], ctx)}
    report = {"embeddings": source, "n_labeled": int(len(labeled)), "n_pseudo_support": int(len(h.pseudo)),
              "n_near_duplicate_support": int(len(h.dup)),
              "truth": cfg.data.truth, "heads": results,
              "notes": ["LOO: leave-one-out over the labeled images (train + val labels), Wilson 95% interval",
                        "pseudo-labeled support rows follow the labeled image they inherited from (dropped "
                        "with it); LOO with pseudo-labels is still optimistic when they are poor: compare "
                        "loo_labeled_only",
                        "episodic: scored against pseudo-labels: biased",
                        "estimates: src/estimate.py, from the heads' test probabilities and the labels",
                        "test accuracy: public truth, scoring only"]}
    io.write_json(paths.cv_report, report)
    print(format_cv_table(results, cfg.data.truth, cfg.cv.estimator))
    return {"embeddings": source, "loo_accuracy": {k: v["loo"]["accuracy"] for k, v in results.items()},
            "test_accuracy": {k: v["test_accuracy"] for k, v in results.items()}}


def near_duplicate_pass(cfg: Config, paths: RunPaths, data: CompetitionData, x: np.ndarray,
                        device) -> pd.DataFrame | None:
    """Embedding near-duplicates (dedup.embedding): pairs (a, b, cosine) written with their summary."""
    if not cfg.dedup.embedding:
        return None
    index = data.index.assign(label=data.class_ids)  # class ids, as 00_prepare's report uses
    pairs, summary = near_duplicates.find_by_embedding(x, data.images, index, cfg.dedup.embedding_cosine,
                                                       cfg.dedup.neighbors, device)
    io.write_csv(paths.near_duplicate_pairs("heads"), near_duplicates.pair_table(pairs, index))
    io.write_json(paths.near_duplicates("heads"), summary)
    print(near_duplicates.format_summary(summary))
    return pairs


def near_duplicate_support(cfg: Config, paths: RunPaths, data: CompetitionData,
                           embedding_pairs: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test rows, class ids, group = index of the labeled twin in labeled_idx) from the hash pairs of
    00_prepare and the embedding pairs of this stage."""
    parts = [] if embedding_pairs is None else [embedding_pairs[["a", "b"]]]
    if paths.near_duplicate_pairs("prepare").exists():
        parts.append(pd.read_csv(paths.near_duplicate_pairs("prepare"), usecols=["a", "b"]))
    if not parts:
        raise UserError("dedup.test_support: no near-duplicate pairs (enable dedup.hash or dedup.embedding)")
    pairs = pd.concat(parts, ignore_index=True)
    sup = near_duplicates.duplicate_support(pairs, data.class_ids, data.index["split"].to_numpy())
    group = np.searchsorted(data.labeled_idx, sup["source"].to_numpy())
    return sup["row"].to_numpy(np.int64), sup["y"].to_numpy(np.int64), group.astype(np.int64)


def run_head(name: str, cfg: Config, paths: RunPaths, h: HeadInputs, table: pd.DataFrame,
             episode_pool: pd.DataFrame | None, truth, encoder, device, folds: list[CrossFold] = ()) -> dict:
    """One head: test probabilities, LOO (cross-fitted with `folds`), stacker OOF, re-draws, episodes.
    Resumes per head."""
    record_path = paths.head_dir(name) / "cv.json"
    if record_path.exists() and paths.head_probs(name).exists() and paths.head_oof(name).exists():
        print(f"  {name}: done earlier (resumed)")
        return io.read_json(record_path)
    t0 = time.perf_counter()
    seed = cfg.run.seed
    ones = np.ones(len(h.labeled), np.float32)
    groups = np.arange(len(h.labeled))
    # with folds, the oof contract (and every estimate and rule that reads it) takes the cross-fitted LOO
    out = head_outputs(name, cfg, h, table, encoder, device, folds)
    probs, oof, stack, labeled_fp, use_pseudo = (out[k] for k in ("probs", "oof", "stack", "labeled_fp", "use_pseudo"))
    loo_in_sample = cv_summary(leave_one_out(labeled_fp, h.labeled_y), h.labeled_y) if folds else None
    loo_plain = None
    if use_pseudo and len(h.pseudo):  # the same head without pseudo-labels: no echo possible
        plain_fp = fit_predict_fn(name, cfg, h, encoder, device, False, h.labeled, h.labeled_y, ones, groups, h.test,
                                  use_dup=False)
        loo_plain = cv_summary(leave_one_out(plain_fp, h.labeled_y), h.labeled_y)
    max_fits = cfg.cv.encoder_max_fits if out["runs_encoder"] else None
    n_redraws = min(cfg.cv.redraws, max_fits or cfg.cv.redraws)
    draws: dict = {}
    redraws = support_redraws(labeled_fp, h.labeled_y, tuple(cfg.cv.shots), n_redraws, seed, keep=draws)
    if episode_pool is None:
        episodic = {"skipped": "no pseudo-labels (run 02_pseudo)"}
    elif not len(episode_pool):
        episodic = {"skipped": f"no pseudo-label has confidence >= cv.episode_min_confidence "
                               f"({cfg.cv.episode_min_confidence})"}
    else:
        # Episodes: no extra pseudo support (the episode's support is made of pseudo-labels already).
        pool_rows, pool_y = episode_pool["row"].to_numpy(), episode_pool["y"].to_numpy()
        episode_fp = fit_predict_fn(name, cfg, h, encoder, device, False, pool_rows, pool_y,
                                    np.ones(len(pool_rows), np.float32), np.zeros(len(pool_rows), np.int64),
                                    np.zeros(0, np.int64), use_dup=False)
        episodic = episodic_estimate(episode_fp, pool_y, min(cfg.cv.n_way, h.n_classes), cfg.cv.n_shot,
                                     cfg.cv.n_query, min(cfg.cv.episodes, max_fits or cfg.cv.episodes), seed)
    io.write_npy(paths.head_probs(name), probs.astype(np.float32))
    io.write_npy(paths.head_oof(name), oof.astype(np.float32))
    io.write_npy(paths.head_stack_oof(name), stack.astype(np.float32))
    save_redraws(paths.head_redraws(name), draws)
    is_labeled = table["labeled"].to_numpy(bool)
    stack_acc = float((stack[is_labeled].argmax(1) == table["y"].to_numpy()[is_labeled]).mean())
    record = {"loo": cv_summary(oof, h.labeled_y), "loo_labeled_only": loo_plain,
              "loo_in_sample": loo_in_sample, "crossfit_folds": len(folds), "redraws": redraws,
              "episodic": episodic, "stack_oof_labeled_accuracy": stack_acc,
              "test_accuracy": truth_accuracy(probs, truth), "pseudo_support": bool(use_pseudo and len(h.pseudo)),
              "seconds": round(time.perf_counter() - t0, 2)}
    io.write_json(record_path, record)
    io.append_jsonl(paths.log("heads"), {"head": name, **{k: record[k] for k in ("seconds", "test_accuracy")},
                                         "loo_accuracy": record["loo"]["accuracy"]})
    loo = record["loo"]
    print(f"  {name}: LOO {format_interval(loo['accuracy'], loo['interval'])}"
          + ("" if record["test_accuracy"] is None else f"  test {record['test_accuracy']:.4f}")
          + f"  ({record['seconds']:.1f}s)")
    return record


def save_redraws(path, draws: dict) -> None:
    """Per-draw support re-draw arrays ({"<k>-shot": {"support", "query", "probs"}}) as one
    safetensors file with keys "<k>-shot/<array>"; 06_submit scores ensembles on the same draws."""
    import torch

    flat = {f"{shot}/{name}": torch.from_numpy(np.ascontiguousarray(a)) for shot, arrays in draws.items()
            for name, a in arrays.items()}
    if flat:
        io.save_tensors(path, flat)


def load_redraws(path) -> dict:
    """The inverse of save_redraws: {"<k>-shot": {"support", "query", "probs"}} ({} if absent)."""
    if not path.exists():
        return {}
    out: dict = {}
    for key, value in io.load_tensors(path).items():
        shot, name = key.split("/", 1)
        out.setdefault(shot, {})[name] = value.numpy()
    return out


def _predict_test(h: HeadInputs, head, use_pseudo: bool) -> np.ndarray:
    """Fit on every labeled image (plus all pseudo-labeled and near-duplicate support); the test
    images are the query."""
    rows, ys = h.labeled, h.labeled_y
    ws = np.ones(len(rows), np.float32)
    if use_pseudo and len(h.pseudo):
        rows, ys, ws = (np.concatenate([rows, h.pseudo]), np.concatenate([ys, h.pseudo_y]),
                        np.concatenate([ws, h.pseudo_w]))
    if len(h.dup):
        rows, ys, ws = (np.concatenate([rows, h.dup]), np.concatenate([ys, h.dup_y]),
                        np.concatenate([ws, np.ones(len(h.dup), np.float32)]))
    query = h.inputs(head, h.test) if head.transductive else None
    head.fit(h.inputs(head, rows), ys, h.n_classes, query_x=query, support_weight=ws)
    return head.predict_proba(h.inputs(head, h.test))


STAGE = Stage(key="heads", title="few-shot heads and local CV", sections=("data", "heads", "cv", "dedup"), run=run,
              after=("ssl",), optional_after=("pseudo", "metric", "meta"), validate=validate)
