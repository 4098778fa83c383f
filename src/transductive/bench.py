"""`python pipelines/bench.py transductive -c CONFIG run.name=RUN`: our transductive heads against
the implementations users know, on one run's embeddings and its labeled images.

Pairs (ours | reference):
  label propagation (propagation head | scikit-learn LabelSpreading, kNN kernel, as pipelines/baseline.py),
  PT-MAP, TIM, LaplacianShot, BD-CSPN (our heads | easyfsl's, default hyper-parameters),
  transductive fine-tuning (cosine_finetune | easyfsl TransductiveFinetuning),
  ProtoNet, the inductive reference (protonet | easyfsl PrototypicalNetworks).

Two transductive sets (--sets): ``test`` (the labeled and the test images only) and ``all`` (every
image: labeled, unlabeled train and test). Each method gets the same embeddings (the latest stage's,
as 05_heads reads them, L2-normalised), the same labeled support, and is scored on the test images
against cfg.data.truth (scoring only). Seconds are wall time of fit + predict, including every
preprocessing and graph our heads build (a fresh context per method). A reference that cannot run
at a size (easyfsl's LaplacianShot holds dense Q x Q matrices) is reported as skipped.
Writes <run>/bench_transductive.md and .json and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from src import io
from src.config import Config
from src.cv import public_truth, truth_accuracy
from src.data import load_data
from src.errors import UserError
from src.paths import RunPaths
from src.runtime import machine_info, resolve_device
from src.transductive import TransductiveContext, l2_normalize

# (label, our head, reference kind, reference name)
PAIRS = [
    ("label propagation", "propagation", "sklearn", "LabelSpreading"),
    ("PT-MAP", "pt_map", "easyfsl", "PTMAP"),
    ("TIM", "tim", "easyfsl", "TIM"),
    ("LaplacianShot", "laplacianshot", "easyfsl", "LaplacianShot"),
    ("BD-CSPN", "bd_cspn", "easyfsl", "BDCSPN"),
    ("transductive fine-tuning", "cosine_finetune", "easyfsl", "TransductiveFinetuning"),
    ("ProtoNet (inductive)", "protonet", "easyfsl", "PrototypicalNetworks"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sets", default="test,all", help="transductive sets: test (labeled + test images), "
                                                           "all (every image); comma-separated")
    parser.add_argument("--methods", default="", help="comma-separated heads of ours whose pairs to run "
                                                      "(default: all pairs), e.g. pt_map,tim")
    parser.add_argument("--threads", type=int, default=0, help="BLAS / torch threads for every method (0: default)")
    parser.add_argument("--max-dense-gb", type=float, default=4.0,
                        help="skip a reference whose dense (Q, Q) matrices would exceed this")
    parser.add_argument("--no-reference", action="store_true", help="our heads only (no easyfsl / sklearn)")


@dataclasses.dataclass
class Split:
    """One transductive set: rows of the embedding matrix each method sees."""

    name: str
    x: np.ndarray  # (N, D) embeddings of the set's images
    support: np.ndarray  # (L,) rows of the labeled images
    support_y: np.ndarray
    query: np.ndarray  # (Q,) every other row
    test_pos: np.ndarray  # (T,) positions in `query` of the test images, in data.test_idx order


def make_splits(x: np.ndarray, labeled: np.ndarray, labeled_y: np.ndarray, test: np.ndarray,
                names: list[str]) -> list[Split]:
    out = []
    for name in names:
        if name == "test":
            rows = np.concatenate([labeled, test])
        elif name == "all":
            rows = np.concatenate([labeled, np.setdiff1d(np.arange(len(x)), labeled)])
        else:
            raise UserError(f"--sets: expected test or all, got '{name}'")
        n_lab = len(labeled)
        query_global = rows[n_lab:]
        pos = {r: i for i, r in enumerate(query_global.tolist())}
        out.append(Split(name, x[rows], np.arange(n_lab), labeled_y, np.arange(n_lab, len(rows)),
                         np.array([pos[r] for r in test.tolist()], np.int64)))
    return out


def run_ours(name: str, cfg: Config, split: Split, n_classes: int, device) -> dict:
    from src.stages.heads import make_head

    cfg = dataclasses.replace(cfg, heads=dataclasses.replace(
        cfg.heads, transductive_set="all" if split.name == "all" else "query"))
    t0 = time.perf_counter()
    head = make_head(name, cfg, None, device, TransductiveContext(split.x, device))

    def inputs(rows):
        return rows if head.takes_rows else split.x[rows]

    head.fit(inputs(split.support), split.support_y, n_classes,
             query_x=inputs(split.query) if head.transductive else None)
    probs = head.predict_proba(inputs(split.query[split.test_pos]))
    return {"probs": probs, "seconds": time.perf_counter() - t0}


def run_easyfsl(name: str, split: Split, n_classes: int, max_dense_gb: float) -> dict:
    import easyfsl.methods as methods  # requirements-bench.txt

    q = len(split.query)
    if name == "LaplacianShot" and 2 * 4 * q * q / 1e9 > max_dense_gb:
        return {"skipped": f"dense {q}x{q} affinity and distances: {8 * q * q / 1e9:.0f} GB"}
    t0 = time.perf_counter()
    with torch.no_grad():
        model = getattr(methods, name)(use_softmax=True) if name != "PTMAP" else methods.PTMAP()
        model.process_support_set(torch.from_numpy(split.x[split.support]), torch.from_numpy(split.support_y))
        out = model(torch.from_numpy(split.x[split.query])).detach().float().numpy()
    return {"probs": out[split.test_pos], "seconds": time.perf_counter() - t0}


def run_label_spreading(split: Split) -> dict:
    from sklearn.semi_supervised import LabelSpreading

    y = np.full(len(split.x), -1)
    y[split.support] = split.support_y
    t0 = time.perf_counter()
    model = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=100).fit(split.x, y)
    probs = model.label_distributions_[split.query[split.test_pos]]
    return {"probs": probs, "seconds": time.perf_counter() - t0}


def _cell(result: dict | None, truth) -> tuple[str, str]:
    if result is None:
        return "-", "-"
    if "skipped" in result:
        return "skipped", result["skipped"]
    acc = truth_accuracy(result["probs"], truth)
    return ("-" if acc is None else f"{acc:.4f}"), f"{result['seconds']:.2f}"


def bench_transductive(cfg: Config, args) -> dict:
    from src.stages.heads import embedding_stage

    paths = RunPaths(cfg)
    data = load_data(paths)
    source = embedding_stage(cfg, paths)
    x = l2_normalize(np.asarray(io.read_npy(paths.embeddings(source)), np.float32))
    truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
    device = resolve_device(cfg.run.device)
    labeled = data.labeled_idx
    wanted = [m for m in args.methods.split(",") if m]
    pairs = [p for p in PAIRS if not wanted or p[1] in wanted]
    if wanted and len(pairs) != len(wanted):
        raise UserError(f"--methods: expected some of {', '.join(p[1] for p in PAIRS)}, got '{args.methods}'")
    splits = make_splits(x, labeled, data.class_ids[labeled], data.test_idx, [s for s in args.sets.split(",") if s])
    if not args.no_reference and any(kind == "easyfsl" for _, _, kind, _ in pairs):
        try:
            import easyfsl  # noqa: F401
        except ImportError:
            raise UserError("easyfsl: not installed (pip install -r requirements-bench.txt -c requirements.txt, "
                            "or pass --no-reference)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, record = [], {"run": cfg.run.name, "embeddings": source, "n_images": int(len(x)), "dim": int(x.shape[1]),
                        "truth": cfg.data.truth, "threads": args.threads or torch.get_num_threads(),
                        "machine": machine_info(device), "date": time.strftime("%Y-%m-%d"), "results": []}
    with threadpool_limits(args.threads or None):
        for split in splits:
            for label, ours, kind, ref in pairs:
                mine = run_ours(ours, cfg, split, data.n_classes, device)
                theirs = None
                if not args.no_reference:
                    theirs = (run_label_spreading(split) if kind == "sklearn"
                              else run_easyfsl(ref, split, data.n_classes, args.max_dense_gb))
                a_acc, a_s = _cell(mine, truth)
                b_acc, b_s = _cell(theirs, truth)
                rows.append(f"| {split.name} ({len(split.x)}) | {label} | {a_acc} | {a_s} | {kind} {ref} "
                            f"| {b_acc} | {b_s} |")
                record["results"].append({"set": split.name, "n": int(len(split.x)), "method": label, "ours": ours,
                                          "ours_accuracy": a_acc, "ours_seconds": a_s, "reference": f"{kind} {ref}",
                                          "reference_accuracy": b_acc, "reference_seconds": b_s})
                print(rows[-1], flush=True)
    header = (f"Transductive methods on run '{cfg.run.name}' ({source} embeddings, {x.shape[0]}x{x.shape[1]}), "
              f"{len(labeled)} labeled images, accuracy on the test images ({cfg.data.truth or 'no truth file'}), "
              f"{record['threads']} threads, {record['date']}.\n\n"
              "| set (images) | method | ours acc | ours s | reference | ref acc | ref s |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
    text = header + "\n" + "\n".join(rows) + "\n"
    io.write_text(paths.run / "bench_transductive.md", text)
    io.write_json(paths.run / "bench_transductive.json", record)
    print("\n" + text + f"written: {paths.run / 'bench_transductive.md'} and .json")
    return record
