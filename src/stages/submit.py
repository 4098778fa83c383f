"""Stage 06: ensemble the heads (and the 04_meta methods), write the submissions, render the report.

Members: every head of 05_heads and every 04_meta method that wrote the head contract
(``probs_test.npy`` + ``oof.npy``), or ``ensemble.members``. All four combiners are scored on local
CV (leave-one-out probabilities of the labeled images; the weighted mean's weights are chosen on
those probabilities and scored nested); ``ensemble.method`` is the one submitted, or with "auto"
the combiner with the best local CV (ties: lower log-loss, then the simpler one). The LightGBM
stacker trains on the heads' group-fold out-of-fold probabilities (labeled + pseudo-labeled rows,
see src/ensemble.py); its CV is its own out-of-fold accuracy on the labeled rows.

Truth (data.truth) only scores: it is printed beside local CV and drawn in the report.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from src import io
from src.config import Config
from src.cv import cv_summary, public_truth, truth_accuracy
from src.data import CompetitionData, load_data
from src.ensemble import (check_folds, fit_stacker, greedy_weights, log_loss, mean_probs, nested_weighted_oof,
                          rank_average, stack_oof)
from src.errors import UserError
from src.paths import RunPaths
from src.stages import Stage
from src.submission import write_submission

COMBINERS = ("mean", "weighted", "rank", "stack")  # simplest first: "auto" breaks full ties by this order
METHODS = ("auto", *COMBINERS)


def discover_members(cfg: Config, paths: RunPaths) -> dict[str, dict]:
    """name -> {"probs", "oof", "stack" (path or None), "source"}: 05_heads heads, then 04_meta
    methods as meta_<method>. ensemble.members (if set) selects and orders them."""
    found: dict[str, dict] = {}
    for stage, prefix in (("heads", ""), ("meta", "meta_")):
        root = paths.stage(stage)
        if not root.is_dir() or (stage == "meta" and not paths.done_marker("meta").exists()):
            continue
        names = [h for h in cfg.heads.heads if (root / h).is_dir()] if stage == "heads" else []
        names += sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in names)
        for name in names:
            if paths.head_probs(name, stage).exists() and paths.head_oof(name, stage).exists():
                stack = paths.head_stack_oof(name, stage)
                found[prefix + name] = {"probs": paths.head_probs(name, stage), "oof": paths.head_oof(name, stage),
                                        "stack": stack if stack.exists() else None, "source": stage}
    if cfg.ensemble.members:
        unknown = [m for m in cfg.ensemble.members if m not in found]
        if unknown:
            available = ", ".join(found) or "none"
            raise UserError(f"ensemble.members: '{unknown[0]}' has no outputs (available: {available})")
        found = {m: found[m] for m in cfg.ensemble.members}
    if not found:
        raise UserError(f"{paths.stage('heads')}: no head outputs to ensemble (run 05_heads first)")
    return found


def _load_probs(path, rows: int, n_classes: int) -> np.ndarray:
    """A probability matrix (rows, C), checked: shape, finite, non-negative, rows summing to 1."""
    a = io.read_npy(path)
    if a.ndim != 2 or a.shape != (rows, n_classes):
        raise UserError(f"{path}: shape {a.shape}, expected ({rows}, {n_classes})")
    if not np.isfinite(a).all() or (a < 0).any() or np.abs(a.sum(1) - 1).max() > 1e-3:
        raise UserError(f"{path}: not probabilities (non-finite, negative or rows not summing to 1)")
    return a.astype(np.float32)


def load_members(members: dict[str, dict], data: CompetitionData, table: pd.DataFrame | None) -> dict[str, dict]:
    """Read and check every member's arrays before anything is written."""
    c, out = data.n_classes, {}
    for name, m in members.items():
        out[name] = {**m, "probs": _load_probs(m["probs"], len(data.test_idx), c),
                     "oof": _load_probs(m["oof"], len(data.labeled_idx), c),
                     "stack": None if (m["stack"] is None or table is None) else _load_probs(m["stack"], len(table), c)}
    return out


def run(cfg: Config, paths: RunPaths) -> dict:
    e = cfg.ensemble
    if e.method not in METHODS:
        raise UserError(f"ensemble.method: expected one of {', '.join(METHODS)}, got '{e.method}'")
    data = load_data(paths)
    truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
    table = pd.read_csv(paths.stack_table) if paths.stack_table.exists() else None
    members = load_members(discover_members(cfg, paths), data, table)
    y = data.class_ids[data.labeled_idx]
    names = list(members)
    oofs = [members[n]["oof"] for n in names]
    probs = [members[n]["probs"] for n in names]

    # ---- every member and combiner on local CV (labeled rows) ----
    rows: dict[str, dict] = {}
    for n in names:
        rows[n] = {**cv_summary(members[n]["oof"], y), "log_loss": log_loss(members[n]["oof"], y),
                   "test_accuracy": truth_accuracy(members[n]["probs"], truth), "source": members[n]["source"]}
    weights = greedy_weights(oofs, y, e.weight_rounds)
    combos = {
        "mean": (mean_probs(oofs), mean_probs(probs), "equal weights"),
        "weighted": (nested_weighted_oof(oofs, y, e.weight_rounds), mean_probs(probs, weights),
                     "weights: greedy selection on LOO probabilities; CV nested"),
        "rank": (rank_average(oofs), rank_average(probs), "per-class rank average"),
    }
    stackable = [n for n in names if members[n]["stack"] is not None]
    stack_info = None
    if stackable:
        stack_info = run_stacker(cfg, members, stackable, table, data.n_classes)
        combos["stack"] = (stack_info.pop("labeled_oof"), stack_info.pop("test_probs"),
                           f"LightGBM on {len(stackable)} heads' group-fold OOF, {len(table)} rows")
    elif e.method == "stack":
        raise UserError(f"ensemble.method=stack: no member has stacker features ({paths.stack_table} / stack_oof.npy)")
    for key, (oof, test, note) in combos.items():
        rows[f"ensemble:{key}"] = {**cv_summary(oof, y), "log_loss": log_loss(oof, y),
                                   "test_accuracy": truth_accuracy(test, truth), "note": note}
    method = e.method
    if method == "auto":  # on local CV only: accuracy, then log-loss, then the simpler combiner
        method = min(combos, key=lambda k: (-rows[f"ensemble:{k}"]["accuracy"], rows[f"ensemble:{k}"]["log_loss"],
                                             COMBINERS.index(k)))

    # ---- submissions ----
    final = combos[method][1]
    best = max(names, key=lambda n: (rows[n]["accuracy"], -rows[n]["log_loss"]))  # on local CV only
    cv_scores = {n: {k: rows[n][k] for k in ("accuracy", "interval", "n")} for n in rows}
    sidecar = {"method": method, "method_config": e.method, "members": names,
               "weights": {n: float(w) for n, w in zip(names, weights)} if method == "weighted" else None,
               "stack_members": stackable if method == "stack" else None,
               "local_cv": cv_scores, "ensemble_cv": cv_scores[f"ensemble:{method}"], "best_single": best}
    sub = write_submission(cfg, paths.submission("ensemble"), data.test_ids, data.classes[final.argmax(1)],
                           data.classes, sidecar)
    written = {"ensemble": str(sub)}
    if e.write_best_single:
        single = write_submission(cfg, paths.submission(best), data.test_ids,
                                  data.classes[members[best]["probs"].argmax(1)], data.classes,
                                  {"method": "single", "members": [best], "local_cv": {best: cv_scores[best]}})
        written[best] = str(single)
    summary = {"method": method, "method_config": e.method, "members": names,
               "weights": dict(zip(names, map(float, weights))),
               "best_single": best, "rows": rows, "stacker": stack_info, "submissions": written}
    io.write_json(paths.stage("submit") / "ensemble.json", summary)

    print_table(rows, cfg.data.truth)
    html = None
    if e.report:
        html = report_for_run(cfg, paths, data, rows, method, final, truth)
        print(f"report: {html}")
    ens = rows[f"ensemble:{method}"]
    line = (f"submission {sub} (ensemble:{method}); local CV {ens['accuracy']:.3f} "
            f"[{ens['interval'][0]:.2f}, {ens['interval'][1]:.2f}]")
    if truth is not None:
        line = (f"{cfg.run.name} test accuracy {ens['test_accuracy']:.4f} (truth file {cfg.data.truth}, "
                f"{int((truth >= 0).sum())} images); " + line)
    print(line)
    return {"method": method, "local_cv": ens["accuracy"], "test_accuracy": ens["test_accuracy"],
            "best_single": best, "submission": str(sub), "report": None if html is None else str(html)}


def run_stacker(cfg: Config, members: dict, stackable: list[str], table: pd.DataFrame, n_classes: int) -> dict:
    """LightGBM on the concatenated group-fold OOF probabilities; CV on the same group folds."""
    e = cfg.ensemble
    folds, groups = table["fold"].to_numpy(), table["group"].to_numpy()
    check_folds(groups, folds)  # a split group would leak its label into its own features
    feats = np.hstack([members[n]["stack"] for n in stackable])
    yr, wr = table["y"].to_numpy(), table["weight"].to_numpy(np.float64)
    labeled = table["labeled"].to_numpy(bool)
    kw = dict(rounds=e.stacker_rounds, lr=e.stacker_lr, leaves=e.stacker_leaves, seed=cfg.run.seed)
    oof = stack_oof(feats, yr, folds, wr, n_classes, **kw)
    model = fit_stacker(feats, yr, wr, n_classes, **kw)
    test = model(np.hstack([members[n]["probs"] for n in stackable]))
    # The table's labeled rows are data.labeled_idx in order (written so by 05_heads).
    pseudo_agree = float((oof[~labeled].argmax(1) == yr[~labeled]).mean()) if (~labeled).any() else None
    best_member_oof = max(float((members[n]["stack"][labeled].argmax(1) == yr[labeled]).mean()) for n in stackable)
    return {"labeled_oof": oof[labeled], "test_probs": test, "members": stackable, "rows": int(len(table)),
            "pseudo_rows": int((~labeled).sum()), "pseudo_agreement": pseudo_agree,
            "best_member_group_fold_accuracy": best_member_oof}


def report_for_run(cfg: Config, paths: RunPaths, data: CompetitionData, rows: dict, method: str,
                   final: np.ndarray, truth: np.ndarray | None):
    """Gather the report's inputs (embeddings the heads used, pseudo-labels, truth) and render it."""
    from src.report import render_report
    from src.stages.heads import read_pseudo_labels

    n = len(data.index)
    rng = np.random.default_rng(cfg.run.seed)
    source = io.read_json(paths.cv_report).get("embeddings") if paths.cv_report.exists() else None
    emb = io.read_npy(paths.embeddings(source), mmap=True) if source and paths.embeddings(source).exists() else None
    tsne_rows, colours, labeled_mask = None, [], None
    if emb is not None and cfg.ensemble.report_tsne_points > 0:
        # Labeled rows first, then test rows, then other unlabeled rows, up to report_tsne_points.
        others = np.setdiff1d(np.arange(n), np.concatenate([data.labeled_idx, data.test_idx]))
        budget = max(cfg.ensemble.report_tsne_points - len(data.labeled_idx), 0)
        test = rng.permutation(data.test_idx)[:budget]
        rest = rng.permutation(others)[:max(budget - len(test), 0)]
        tsne_rows = np.concatenate([data.labeled_idx, np.sort(test), np.sort(rest)])
        base = np.full(n, -1, np.int64)
        base[data.labeled_idx] = data.class_ids[data.labeled_idx]
        pseudo = read_pseudo_labels(paths, data)
        if pseudo is not None:
            by_pseudo = base.copy()
            by_pseudo[pseudo["row"].to_numpy()] = pseudo["y"].to_numpy()
            colours.append(("pseudo-labels (selected)", by_pseudo[tsne_rows]))
        by_pred = base.copy()
        by_pred[data.test_idx] = final.argmax(1)
        colours.append((f"submitted predictions (ensemble:{method})", by_pred[tsne_rows]))
        if truth is not None:
            by_truth = base.copy()
            by_truth[data.test_idx] = truth
            colours.append(("truth (scoring only)", by_truth[tsne_rows]))
        labeled_mask = np.isin(tsne_rows, data.labeled_idx)
    ens = rows[f"ensemble:{method}"]
    confusion = None
    if truth is not None:
        known = truth >= 0
        caption = f"ensemble:{method}, accuracy {ens['test_accuracy']:.4f} on {int(known.sum())} images"
        confusion = (truth[known], final.argmax(1)[known], caption)
    lines = [f"run {cfg.run.name}; embeddings from {source}; {len(data.labeled_idx)} labeled images; "
             f"{len(data.test_idx)} test images",
             f"submitted: ensemble:{method}, local CV {ens['accuracy']:.3f} "
             f"[{ens['interval'][0]:.2f}, {ens['interval'][1]:.2f}]"
             + ("" if ens["test_accuracy"] is None else f", truth accuracy {ens['test_accuracy']:.4f}")]
    return render_report(paths, f"Run report: {cfg.run.name}", rows, data.classes.tolist(), emb, tsne_rows,
                         colours, labeled_mask, confusion, lines, cfg.run.seed, cfg.dedup.report_pairs)


def print_table(rows: dict[str, dict], truth_name: str) -> None:
    header = ["member", "local CV [95% CI]", "log-loss"] + (["test acc (truth)"] if truth_name else [])
    table = [header]
    for n, r in rows.items():
        line = [n, f"{r['accuracy']:.3f} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]", f"{r['log_loss']:.3f}"]
        if truth_name:
            line.append("-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}")
        table.append(line)
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


STAGE = Stage(key="submit", title="ensemble, submissions and run report", sections=("data", "ensemble", "dedup"), run=run,
              after=("heads",), optional_after=("meta",))
