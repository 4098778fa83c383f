"""Cross-fitted leave-one-out of a tail self-training round (pseudo.self_trainer: tail): how much of
the round's LOO is echo. A research diagnostic on a finished run, not a stage.

    python scripts/crossfit_loo.py -c configs/cifar_cpu_pretrained.yaml run.name=RUN [--folds 3]

RUN must have its 01_ssl (with ssl.trunk_cut) and 02_pseudo. The labeled images are split into
`folds` folds, each holding one image of every class in turn. For each fold k:
1. propagation on 01_ssl's embeddings with every label outside fold k -> 02_pseudo's selection;
2. the tail of 01_ssl's encoder self-trained on those pseudo-labels and the labels outside fold k,
   as 02_pseudo's round 1 does, and the Lite0 block embedded again through it;
3. each image of fold k held out in turn: label propagation (02_pseudo's labeler) with the other
   labels on that embedding, which never saw fold k's labels.
The same LOO on 01_ssl's embeddings (frozen) and on 02_pseudo's (the round trained with every label)
is printed beside it. With data.truth, each embedding's propagation with every label is scored on it
(reporting only; nothing above reads it). JSON lines on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from src import io  # noqa: E402
from src.config import load_config  # noqa: E402
from src.data.dataset import load_data  # noqa: E402
from src.models.encoder import load_encoder  # noqa: E402
from src.models.split import embed_tail  # noqa: E402
from src.paths import RunPaths  # noqa: E402
from src.probe import truth_rows  # noqa: E402
from src.pseudo.labelers import LABELERS, LabelingContext  # noqa: E402
from src.pseudo.selection import pseudo_label  # noqa: E402
from src.pseudo.tail import self_train_tail  # noqa: E402
from src.ssl.trainer import replace_first_block  # noqa: E402
from src.transductive import center_normalize, compute_prototypes  # noqa: E402


def label_folds(y: np.ndarray, folds: int) -> np.ndarray:
    """(L,) fold of each labeled image: the i-th image of each class goes to fold i mod `folds`."""
    out = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        out[rows] = np.arange(len(rows)) % folds
    return out


def propagation_graph(cfg, x: np.ndarray, lab: np.ndarray, ly: np.ndarray, n: int) -> LabelingContext:
    """02_pseudo's labeling context over the centred embeddings x with every label, its kNN graph built
    once: dataclasses.replace(ctx, labeled_idx=..., labeled_y=...) reuses it."""
    ctx = LabelingContext(center_normalize(x), lab, ly, n, cfg.pseudo)
    ctx.graph()
    return ctx


def propagation_loo(ctx: LabelingContext, held: np.ndarray) -> np.ndarray:
    """Class predicted for each labeled row in `held` (indices into ctx's labels) by label propagation
    with every other label, on ctx's graph."""
    lab, ly = ctx.labeled_idx, ctx.labeled_y
    out = np.zeros(len(held), np.int64)
    for j, i in enumerate(held):
        keep = np.arange(len(lab)) != i
        out[j] = LABELERS.get("propagation")(replace(ctx, labeled_idx=lab[keep], labeled_y=ly[keep]))[lab[i]].argmax()
    return out


def public(cfg, data, ctx: LabelingContext) -> float | None:
    """Accuracy of propagation with every label on the truth file (reporting only); None without one."""
    if not cfg.data.truth:
        return None
    rows, truth = truth_rows(data, cfg.data.truth)
    return round(float((LABELERS.get("propagation")(ctx)[rows].argmax(1) == truth).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    paths = RunPaths(cfg)
    data = load_data(paths)
    lab, ly, n, unl = data.labeled_idx, data.class_ids[data.labeled_idx], data.n_classes, data.unlabeled_idx
    spec = io.read_json(paths.trunk_maps("ssl").with_suffix(".json"))
    cut, dim, blocks = int(spec["cut"]), int(spec["dim"]), int(spec["blocks"])
    maps = io.read_npy(paths.trunk_maps("ssl"))
    frozen = io.read_npy(paths.embeddings("ssl")).astype(np.float32)
    fold = label_folds(ly, args.folds)
    every = np.arange(len(lab))
    graphs = {"frozen": propagation_graph(cfg, frozen, lab, ly, n),
              "round": propagation_graph(cfg, io.read_npy(paths.embeddings("pseudo")).astype(np.float32), lab, ly, n)}
    for name, ctx in graphs.items():
        print(json.dumps({"embeddings": name, "loo": round(float((propagation_loo(ctx, every) == ly).mean()), 4),
                          "public": public(cfg, data, ctx)}), flush=True)
    predicted = np.zeros(len(lab), np.int64)
    for k in range(args.folds):
        t0 = time.perf_counter()
        keep = fold != k
        fold_ctx = replace(graphs["frozen"], labeled_idx=lab[keep], labeled_y=ly[keep])
        res = pseudo_label({"propagation": LABELERS.get("propagation")(fold_ctx)[unl]}, cfg.pseudo)
        rows = np.concatenate([lab[keep], unl[res.selected]])
        y = np.concatenate([ly[keep], res.label[res.selected]])
        encoder = load_encoder(paths.encoder("ssl"), paths.encoder_spec("ssl"))
        self_train_tail(cfg.pseudo, encoder.net, cut, maps, rows, y, lab[keep],
                        compute_prototypes(frozen[rows, :dim], y, n), seed=cfg.run.seed + k)
        xk = replace_first_block(frozen, embed_tail(encoder.net, maps, cut, cfg.ssl.embed_power), blocks)
        held = np.flatnonzero(fold == k)
        predicted[held] = propagation_loo(propagation_graph(cfg, xk, lab, ly, n), held)
        print(json.dumps({"fold": k, "held_out": int(len(held)), "pseudo_labels": int(res.selected.sum()),
                          "accuracy": round(float((predicted[held] == ly[held]).mean()), 4),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"embeddings": "cross-fitted round", "loo": round(float((predicted == ly).mean()), 4),
                      "folds": args.folds}), flush=True)


if __name__ == "__main__":
    main()
