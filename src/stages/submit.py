"""Stage 06: ensemble the heads (and the 04_meta methods), write the submissions, render the report.

Members: every head of 05_heads and every 04_meta method that wrote the head contract
(``probs_test.npy`` + ``oof.npy``) from the stages in ``ensemble.sources``, or ``ensemble.members``.
Every rule of src/ensemble.py's RULES that applies to them is scored on local CV (leave-one-out
probabilities of the labeled images; rules that read labels are scored nested) and, where the
members wrote their support re-draws (05_heads), on the same re-draws, so the reported local CV
carries the spread across supports beside its Wilson interval. ``ensemble.method`` is the rule
submitted; its default was chosen on the re-draw evaluation of src/selection.py (README,
docs/RESULTS.md).

Truth (data.truth) only scores: it is printed beside local CV and drawn in the report.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from src import io
from src.config import Config
from src.cv import cv_summary, format_interval, public_truth, truth_accuracy
from src.data import CompetitionData, load_data
from src.ensemble import (PREFERRED_RULES, RULES, Members, RuleParams, applicable, apply_rules, check_rule,
                          estimate_context, log_loss)
from src.errors import UserError
from src.estimate import check_estimator, estimate_all
from src.paths import RunPaths
from src.stages import Stage
from src.submission import write_submission

SOURCES = ("heads", "meta")


def validate(cfg: Config) -> None:
    e = cfg.ensemble
    check_rule(e.method)
    check_estimator(cfg.cv.estimator)
    if not e.auto_candidates:
        raise UserError("ensemble.auto_candidates: empty list (name at least one rule)")
    for name in e.auto_candidates:
        check_rule(name, "ensemble.auto_candidates")
        if name == "auto":
            raise UserError(f"ensemble.auto_candidates: '{name}' cannot be a candidate of auto")
    if e.method in PREFERRED_RULES and not e.preferred:
        raise UserError(f"ensemble.preferred: empty list (ensemble.method={e.method} needs a member name)")
    if not 0 <= e.gate_agreement <= 1:
        raise UserError(f"ensemble.gate_agreement: must be in [0, 1], got {e.gate_agreement}")
    for key in ("weight_rounds", "agreement_iters", "stacker_rounds", "stacker_leaves"):
        if getattr(e, key) < 1:
            raise UserError(f"ensemble.{key}: must be >= 1, got {getattr(e, key)}")
    bad = [s for s in e.sources if s not in SOURCES]
    if bad or not e.sources:
        raise UserError(f"ensemble.sources: expected a non-empty list of {', '.join(SOURCES)}, got {e.sources}")
    bad = [s for s in e.count_once if s not in SOURCES]
    if bad:
        raise UserError(f"ensemble.count_once: expected stages among {', '.join(SOURCES)}, got '{bad[0]}'")


def discover_members(cfg: Config, paths: RunPaths) -> dict[str, dict]:
    """name -> {"probs", "oof", "stack" (path or None), "source"}: 05_heads heads, then 04_meta
    methods as meta_<method>. ensemble.members (if set) selects and orders them."""
    from src.heads import HEADS

    found: dict[str, dict] = {}
    for stage, prefix in (("heads", ""), ("meta", "meta_")):
        if stage not in cfg.ensemble.sources and not cfg.ensemble.members:
            continue  # ensemble.members, when set, names members of any stage
        root = paths.stage(stage)
        if not root.is_dir() or (stage == "meta" and not paths.done_marker("meta").exists()):
            continue
        names = [h for h in cfg.heads.heads if (root / h).is_dir()] if stage == "heads" else []
        names += sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in names)
        for name in names:
            if paths.head_probs(name, stage).exists() and paths.head_oof(name, stage).exists():
                stack = paths.head_stack_oof(name, stage)
                found[prefix + name] = {"probs": paths.head_probs(name, stage), "oof": paths.head_oof(name, stage),
                                        "stack": stack if stack.exists() else None, "source": stage,
                                        "redraws": paths.head_redraws(name, stage),
                                        "transductive": stage == "heads" and name in HEADS
                                        and bool(HEADS.get(name).transductive)}
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
    data = load_data(paths)
    truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
    table = pd.read_csv(paths.stack_table) if paths.stack_table.exists() else None
    members = load_members(discover_members(cfg, paths), data, table)
    y = data.class_ids[data.labeled_idx]
    names = list(members)
    m = Members(names=names, oof=[members[n]["oof"] for n in names], probs=[members[n]["probs"] for n in names], y=y,
                transductive=[members[n]["transductive"] for n in names],
                stack=[members[n]["stack"] for n in names], table=table, sources=[members[n]["source"] for n in names])
    params = RuleParams.from_config(e, cfg.run.seed, cfg.cv.estimator)
    # Every rule that applies, and the configured one (a UserError when it cannot run).
    wanted = [r for r in RULES if applicable(r, m, params)]
    combos = apply_rules(wanted + [e.method] * (e.method not in wanted), m, params)
    draws, draws_note = member_redraws(members)

    # ---- every member and rule on local CV (labeled rows), accuracy estimates, re-draws and truth ----
    ctx = estimate_context(m, params)
    rows: dict[str, dict] = {}
    for k, n in enumerate(names):
        rows[n] = {**cv_summary(m.oof[k], y), "log_loss": log_loss(m.oof[k], y),
                   "estimates": estimate_all(m.probs[k], m.oof[k], ctx),
                   "redraw": redraw_score(draws, np.eye(len(names))[k], y),
                   "test_accuracy": truth_accuracy(m.probs[k], truth), "source": members[n]["source"]}
    for key, c in combos.items():
        rows[f"ensemble:{key}"] = {**cv_summary(c.oof, y), "log_loss": log_loss(c.oof, y),
                                   "estimates": estimate_all(c.test, c.oof, ctx),
                                   "redraw": redraw_score(draws, c.weights, y),
                                   "test_accuracy": truth_accuracy(c.test, truth), "note": c.note}
    method = e.method

    # ---- submissions ----
    final = combos[method].test
    best = max(names, key=lambda n: (rows[n]["accuracy"], -rows[n]["log_loss"]))  # on local CV only
    cv_scores = {n: {k: rows[n][k] for k in ("accuracy", "interval", "n", "redraw")}
                 | {"estimate": rows[n]["estimates"][cfg.cv.estimator], "estimator": cfg.cv.estimator} for n in rows}
    weights = combos[method].weights
    sidecar = {"method": method, "members": names, "note": combos[method].note,
               "weights": None if weights is None else {n: float(w) for n, w in zip(names, weights)},
               "local_cv": cv_scores, "ensemble_cv": cv_scores[f"ensemble:{method}"], "best_single": best}
    sub = write_submission(cfg, paths.submission("ensemble"), data.test_ids, data.classes[final.argmax(1)],
                           data.classes, sidecar)
    written = {"ensemble": str(sub)}
    if e.write_best_single:
        single = write_submission(cfg, paths.submission(best), data.test_ids,
                                  data.classes[members[best]["probs"].argmax(1)], data.classes,
                                  {"method": "single", "members": [best], "local_cv": {best: cv_scores[best]}})
        written[best] = str(single)
    summary = {"method": method, "members": names, "note": combos[method].note,
               "weights": {r: None if c.weights is None else dict(zip(names, map(float, c.weights)))
                           for r, c in combos.items()},
               "redraws": draws_note, "best_single": best, "rows": rows, "submissions": written}
    io.write_json(paths.stage("submit") / "ensemble.json", summary)

    print_table(rows, cfg.data.truth, draws_note, cfg.cv.estimator)
    html = None
    if e.report:
        html = report_for_run(cfg, paths, data, rows, method, final, truth)
        print(f"report: {html}")
    ens = rows[f"ensemble:{method}"]
    est = ens["estimates"][cfg.cv.estimator]
    line = (f"submission {sub} (ensemble:{method}); estimated accuracy {format_interval(est['estimate'], est['interval'])} "
            f"({cfg.cv.estimator}); LOO {format_cv(ens)}")
    if truth is not None:
        line = (f"{cfg.run.name} test accuracy {ens['test_accuracy']:.4f} (truth file {cfg.data.truth}, "
                f"{int((truth >= 0).sum())} images); " + line)
    print(line)
    return {"method": method, "local_cv": ens["accuracy"], "estimate": est["estimate"],
            "estimate_interval": est["interval"], "estimator": cfg.cv.estimator, "redraw": ens["redraw"],
            "test_accuracy": ens["test_accuracy"], "best_single": best, "submission": str(sub),
            "report": None if html is None else str(html)}


def member_redraws(members: dict[str, dict]) -> tuple[dict | None, str]:
    """The support re-draws of the members that wrote them (05_heads: the same draws for every
    head) at the largest shot count they share: {"shot", "query" (D, Q), "probs" [(D, Q, C) or None
    per member]}, or None with the reason. Members without re-draws (04_meta methods) get None: a
    rule that puts weight on one of them has no re-draw score."""
    from src.stages.heads import load_redraws

    loaded = {n: load_redraws(mem["redraws"]) if mem.get("redraws") is not None else {} for n, mem in members.items()}
    have = [n for n, d in loaded.items() if d]
    if not have:
        return None, "none: no member wrote re-draws"
    shots = sorted(set.intersection(*(set(loaded[n]) for n in have)), key=lambda k: int(k.split("-")[0]))
    if not shots:
        return None, "none: the members share no shot count"
    shot = shots[-1]
    first = loaded[have[0]][shot]
    for n in have:
        if any(loaded[n][shot][k].shape != first[k].shape or (loaded[n][shot][k] != first[k]).any()
               for k in ("support", "query")):
            return None, f"none: member {n} drew other {shot} supports"
    without = [n for n in members if n not in have]
    note = (f"{shot} support re-draws from the labeled images ({len(first['query'])} draws, "
            f"{first['query'].shape[1]} held-out images each)")
    note += f"; none for {', '.join(without)}" if without else ""
    return ({"shot": shot, "query": first["query"],
             "probs": [loaded[n][shot]["probs"] if n in have else None for n in members]}, note)


def redraw_score(draws: dict | None, weights: np.ndarray | None, y: np.ndarray) -> dict | None:
    """Accuracy mean and std over the support re-draws of the members' weighted mean (a rule's
    weights: label-free rules are scored honestly; weights chosen on all labels have seen the
    re-draws' held-out images, so they read optimistic). None without re-draws or weights, or
    when the rule weights a member without re-draws."""
    if draws is None or weights is None:
        return None
    w = np.asarray(weights, np.float64)
    if any(wi > 0 and p is None for wi, p in zip(w, draws["probs"])):
        return None
    combined = sum(wi * p.astype(np.float64) for wi, p in zip(w, draws["probs"]) if wi > 0)  # (D, Q, C)
    accs = (combined.argmax(2) == y[draws["query"]]).mean(1)
    return {"shot": draws["shot"], "mean": float(accs.mean()), "std": float(accs.std()), "n_draws": int(len(accs))}


def format_cv(r: dict) -> str:
    """'0.900 [0.74, 0.97], 2-shot re-draws 0.880 ± 0.070': LOO with its Wilson 95% interval (the
    noise of scoring 30 images) and, when known, the spread over support re-draws."""
    text = format_interval(r["accuracy"], r["interval"])
    d = r.get("redraw")
    return text + ("" if not d else f", {d['shot']} re-draws {d['mean']:.3f} ± {d['std']:.3f}")


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
    est = ens["estimates"][cfg.cv.estimator]
    lines = [f"run {cfg.run.name}; embeddings from {source}; {len(data.labeled_idx)} labeled images; "
             f"{len(data.test_idx)} test images",
             f"submitted: ensemble:{method}, estimated accuracy {format_interval(est['estimate'], est['interval'])} "
             f"({cfg.cv.estimator}), LOO {format_interval(ens['accuracy'], ens['interval'])}"
             + ("" if ens["test_accuracy"] is None else f", truth accuracy {ens['test_accuracy']:.4f}")]
    return render_report(paths, f"Run report: {cfg.run.name}", rows, data.classes.tolist(), emb, tsne_rows,
                         colours, labeled_mask, confusion, lines, cfg.run.seed, cfg.dedup.report_pairs)


def print_table(rows: dict[str, dict], truth_name: str, redraw_note: str = "", estimator: str = "") -> None:
    header = ["member", *([f"estimate ({estimator}) [95%]"] if estimator else []), "LOO [95% CI]",
              "re-draws mean ± std", "log-loss"]
    header += ["test acc (truth)"] if truth_name else []
    table = [header]
    for n, r in rows.items():
        d = r.get("redraw")
        line = [n, *([format_interval(r["estimates"][estimator]["estimate"], r["estimates"][estimator]["interval"])] if estimator else []),
                format_interval(r["accuracy"], r["interval"]),
                "-" if not d else f"{d['mean']:.3f} ± {d['std']:.3f}", f"{r['log_loss']:.3f}"]
        if truth_name:
            line.append("-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}")
        table.append(line)
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if redraw_note:
        print(f"re-draws: {redraw_note}; rules whose weights read labels saw the held-out images (optimistic)")


STAGE = Stage(key="submit", title="ensemble, submissions and run report",
              sections=("data", "ensemble", "cv", "dedup"), run=run,
              after=("heads",), optional_after=("meta",), validate=validate)
