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
With ``--draws K`` each method also runs on K support re-draws: the competition's number of labeled
images per class drawn from the test images the truth file labels (seeded; those images then leave
the scored set, and the competition's labeled images become unlabeled nodes). The table then gives
mean +- std accuracy over the draws and the paired difference ours - reference (mean [min, max]): the
project is judged on other label draws of the same images, so one draw's difference of a few images
is not a ranking. The truth file is read for scoring and for drawing supports in this bench only;
no stage reads it.
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
    parser.add_argument("--draws", type=int, default=0,
                        help="support re-draws from the truth-labeled test images (0: the competition's support)")


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


@dataclasses.dataclass
class Case:
    """One labeled support and the test images scored against it."""

    name: str
    labeled: np.ndarray  # (L,) global rows of the support
    labeled_y: np.ndarray  # (L,) their class ids
    test: np.ndarray  # (T,) global rows of the scored images, in order
    truth: np.ndarray | None  # (T,) class ids, -1 = unknown (not scored)


def draw_cases(labeled_y: np.ndarray, test: np.ndarray, truth: np.ndarray, n_classes: int, draws: int,
               seed: int = 0) -> list[Case]:
    """`draws` supports of the competition's shape (as many images per class as labeled_y has), drawn
    without replacement from the test images with a known class (truth >= 0); draw d uses seed + d.
    The drawn images leave the scored set."""
    per_class = np.bincount(labeled_y, minlength=n_classes)
    out = []
    for d in range(draws):
        rng = np.random.default_rng(seed + d)
        chosen = []
        for c in np.flatnonzero(per_class):
            pool = np.flatnonzero(truth == c)
            if len(pool) < per_class[c]:
                raise UserError(f"--draws: the truth file labels {len(pool)} test images of class {c}, "
                                f"fewer than the {per_class[c]} a support needs")
            chosen.append(rng.choice(pool, per_class[c], replace=False))
        pos = np.concatenate(chosen)
        keep = np.setdiff1d(np.arange(len(test)), pos)
        out.append(Case(f"draw {d}", test[pos], truth[pos], test[keep], truth[keep]))
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


def _score(result: dict | None, truth) -> dict | None:
    if result is None:
        return None
    if "skipped" in result:
        return {"skipped": result["skipped"]}
    return {"accuracy": truth_accuracy(result["probs"], truth), "seconds": result["seconds"]}


def _summary(side: str, cells: list) -> dict:
    """Mean / std accuracy and mean seconds over cases, or the skip reason."""
    if any(c is None for c in cells):
        return {f"{side}_accuracy": None, f"{side}_seconds": None}
    skipped = [c["skipped"] for c in cells if "skipped" in c]
    if skipped:
        return {f"{side}_skipped": skipped[0]}
    acc = [c["accuracy"] for c in cells]
    out = {f"{side}_seconds": float(np.mean([c["seconds"] for c in cells]))}
    if all(a is not None for a in acc):
        out.update({f"{side}_accuracy": float(np.mean(acc)), f"{side}_accuracy_std": float(np.std(acc)),
                    f"{side}_accuracies": acc})
    else:
        out[f"{side}_accuracy"] = None
    return out


def _paired(ours: list, theirs: list) -> dict:
    """ours - reference accuracy per case (mean, min, max), where both have one."""
    diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(ours, theirs)
             if a and b and a.get("accuracy") is not None and b.get("accuracy") is not None]
    if not diffs:
        return {}
    return {"difference_mean": float(np.mean(diffs)), "difference_min": float(np.min(diffs)),
            "difference_max": float(np.max(diffs))}


def _row(entry: dict, draws: bool) -> str:
    def acc(side):
        if f"{side}_skipped" in entry:
            return "skipped"
        a = entry.get(f"{side}_accuracy")
        if a is None:
            return "-"
        return f"{a:.4f}" + (f" ± {entry[side + '_accuracy_std']:.4f}" if draws else "")

    def sec(side):
        if f"{side}_skipped" in entry:
            return entry[f"{side}_skipped"]
        s = entry.get(f"{side}_seconds")
        return "-" if s is None else f"{s:.2f}"

    row = (f"| {entry['set']} ({entry['n']}) | {entry['method']} | {acc('ours')} | {sec('ours')} | "
           f"{entry['reference']} | {acc('reference')} | {sec('reference')} |")
    if draws:
        row += (f" {100 * entry['difference_mean']:+.2f} pt [{100 * entry['difference_min']:+.2f}, "
                f"{100 * entry['difference_max']:+.2f}] |" if "difference_mean" in entry else " - |")
    return row


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
    sets = [s for s in args.sets.split(",") if s]
    make_splits(x, labeled, data.class_ids[labeled], data.test_idx, sets)  # bad --sets: exit 2 before any work
    if args.draws < 0:
        raise UserError(f"--draws: expected an integer >= 0, got {args.draws}")
    if args.draws and truth is None:
        raise UserError("--draws: needs data.truth (supports are drawn from the truth-labeled test images)")
    cases = ([Case("competition", labeled, data.class_ids[labeled], data.test_idx, truth)] if not args.draws else
             draw_cases(data.class_ids[labeled], data.test_idx, truth, data.n_classes, args.draws))
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
                        "draws": args.draws, "machine": machine_info(device), "date": time.strftime("%Y-%m-%d"),
                        "results": []}
    with threadpool_limits(args.threads or None):
        for set_name in sets:
            for label, ours, kind, ref in pairs:
                cells = {"ours": [], "reference": []}  # per case: (accuracy or None, seconds) or a skip reason
                for case in cases:
                    split = make_splits(x, case.labeled, case.labeled_y, case.test, [set_name])[0]
                    mine = run_ours(ours, cfg, split, data.n_classes, device)
                    theirs = None
                    if not args.no_reference:
                        theirs = (run_label_spreading(split) if kind == "sklearn"
                                  else run_easyfsl(ref, split, data.n_classes, args.max_dense_gb))
                    cells["ours"].append(_score(mine, case.truth))
                    cells["reference"].append(_score(theirs, case.truth))
                n = len(x) if set_name == "all" else len(cases[0].labeled) + len(cases[0].test)
                entry = {"set": set_name, "n": int(n), "method": label, "ours": ours, "reference": f"{kind} {ref}",
                         **_summary("ours", cells["ours"]), **_summary("reference", cells["reference"]),
                         **_paired(cells["ours"], cells["reference"])}
                record["results"].append(entry)
                rows.append(_row(entry, bool(args.draws)))
                print(rows[-1], flush=True)
    header = (f"Transductive methods on run '{cfg.run.name}' ({source} embeddings, {x.shape[0]}x{x.shape[1]}), "
              f"{len(labeled)} labeled images, accuracy on the test images ({cfg.data.truth or 'no truth file'}), "
              f"{record['threads']} threads, {record['date']}.\n"
              + (f"Accuracy: mean +- std over {args.draws} support re-draws (--draws); seconds: mean per fit.\n\n"
                 if args.draws else "\n")
              + "| set (images) | method | ours acc | ours s | reference | ref acc | ref s |"
              + (" ours - ref: mean [min, max] |\n" if args.draws else "\n")
              + "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.draws else ""))
    text = header + "\n" + "\n".join(rows) + "\n"
    io.write_text(paths.run / "bench_transductive.md", text)
    io.write_json(paths.run / "bench_transductive.json", record)
    print("\n" + text + f"written: {paths.run / 'bench_transductive.md'} and .json")
    return record
