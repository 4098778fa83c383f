"""Re-draw evaluation of the ensemble rules: which rule to submit, measured against truth.

One competition gives one support (2 train + 1 validation labeled images per class) and, on the
real data, no truth; 30 labels cannot tell the ensemble rules apart (a LOO accuracy over 30 images
carries a 95% interval of about +-16 points). On a competition whose every image's label is known
(the embedded digits data: :func:`src.data.digits.digits_labels`), this module draws many new
supports of the competition's shape and reruns everything that depends on labels, so each rule is
scored against truth on many supports:

    for each draw d (seeded): 3 labeled images per class from the NON-test images (never a scored one)
        02_pseudo round 0 on the label-free SSL embeddings, seeded by the draw's labels
        every member (a 05_heads head, inductive or transductive: propagation, pt_map, ...) ->
            test probabilities, leave-one-out probabilities of the 30 labeled images, stacker OOF
        every rule of src.ensemble.RULES on the members (the rules see no truth) ->
            test accuracy against truth, local CV (LOO, nested where the rule reads labels)

What is NOT redone per draw (say so when quoting the numbers): the SSL encoder and its embeddings
(label-free: the same for every draw), 02_pseudo's self-training rounds (round 0 only: the demo
runs no rounds) and 03_metric (label-dependent embeddings: the evaluator's heads read the SSL
embeddings). 04_meta's methods are members when named meta_<method> (``--members``): each draw
meta-trains them from the SSL encoder on an episode pool of the draw's round-0 pseudo-labels (a run
starts them from 03_metric's encoder when it has one).

Outputs (paths.redraw_dir): results.json (per draw and aggregated), table.md, and a per-draw,
per-member cache of the member arrays keyed by a fingerprint of the config, seed and code
version, so adding members or rules recomputes only what is new.

    python pipelines/redraw.py -c configs/demo.yaml --draws 30
"""
from __future__ import annotations

import hashlib
import json
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from src import io
from src.config import Config
from src.cv import cv_summary, truth_accuracy
from src.data import CompetitionData, load_data
from src.ensemble import PREFERRED_RULES, RULES, Members, RuleParams, check_rule, estimate_context
from src.ensemble import apply_rules as ensemble_rules
from src.errors import UserError
from src.estimate import ESTIMATORS, estimate_all, gde_estimate
from src.paths import RunPaths

# ---------------------------------------------------------------------------------------------
# Labels the builder knows, and the draws
# ---------------------------------------------------------------------------------------------
def known_labels(cfg: Config, data: CompetitionData, labels_csv: str = "") -> np.ndarray:
    """Class ids (N,) of every prepared image whose label is known to the data's builder (or listed in
    `labels_csv`, image_id,label), -1 elsewhere. Checked against the competition's own labels and
    against the truth file: a mismatch means the folder was not built by this builder."""
    if labels_csv:
        from src.data.competition import read_id_label_csv

        frame, where = read_id_label_csv(Path(labels_csv)), labels_csv
    elif cfg.data.builder in ("digits", "digits_names"):
        from src.data.digits import digits_labels

        frame, where = digits_labels(cfg.data.demo_test_size, 0, cfg.data.builder == "digits_names"), "digits builder"
    else:
        raise UserError("data.builder: the re-draw evaluation needs every image's label; only the digits builder "
                        "knows them (data.builder=digits or digits_names), or pass --labels image_id,label CSV")
    lookup = {c: i for i, c in enumerate(data.classes.tolist())}
    by_id = dict(zip(frame["image_id"], frame["label"]))
    out = np.array([lookup.get(by_id.get(i, None), -1) for i in data.index["image_id"]], np.int64)
    known = data.labeled_idx
    unlisted = known[out[known] < 0]  # a labels file of test images only: the competition's labels stand
    out[unlisted] = data.class_ids[unlisted]
    if (out[known] != data.class_ids[known]).any():
        bad = data.index["image_id"].iloc[known[out[known] != data.class_ids[known]][0]]
        raise UserError(f"{where}: label of '{bad}' differs from the competition's (not built by this builder?)")
    if cfg.data.truth and Path(cfg.data.truth).exists():
        from src.cv import public_truth

        truth = public_truth(cfg.data.truth, data.test_ids, data.classes)
        seen = truth >= 0
        if (out[data.test_idx][seen] != truth[seen]).any():
            raise UserError(f"{where}: test labels differ from {cfg.data.truth}")
    return out


def draw_supports(pool_rows: np.ndarray, pool_y: np.ndarray, n_classes: int, n_per_class: int, n_draws: int,
                  seed: int) -> np.ndarray:
    """(n_draws, n_classes * n_per_class) rows: each draw takes n_per_class rows of every class from
    `pool_rows` (labels `pool_y`) without replacement, class by class. Draw d depends only on (seed, d),
    so a longer run extends a shorter one."""
    pool_rows, pool_y = np.asarray(pool_rows), np.asarray(pool_y)
    by_class = [pool_rows[pool_y == c] for c in range(n_classes)]
    short = [c for c, r in enumerate(by_class) if len(r) < n_per_class]
    if short:
        raise UserError(f"re-draws: class {short[0]} has {len(by_class[short[0]])} non-test images with a known "
                        f"label, need {n_per_class} per draw")
    out = np.empty((n_draws, n_classes * n_per_class), np.int64)
    for d in range(n_draws):
        rng = np.random.default_rng([seed, d])
        out[d] = np.concatenate([rng.choice(r, n_per_class, replace=False) for r in by_class])
    return out


def relabel(data: CompetitionData, support: np.ndarray, labels: np.ndarray) -> CompetitionData:
    """The competition as if `support` rows were its only labeled images: index label = the class
    value of `labels[row]` on support rows and -1 everywhere else (test rows included). The images
    are shared (memmap); nothing else of the original labels survives."""
    index = data.index.copy()
    values = np.full(len(index), -1, np.int64)
    values[support] = data.classes[labels[support]]
    index["label"] = values
    split = index["split"].to_numpy().copy()
    split[support[split[support] == "test"]] = "train"  # a labeled test image is support, not scored
    index["split"] = split
    return CompetitionData(images=data.images, index=index)


# ---------------------------------------------------------------------------------------------
# Members of one draw
# ---------------------------------------------------------------------------------------------
META_PREFIX = "meta_"  # a 04_meta method as a member: meta_<method>, as 06_submit names it


def member_source(name: str) -> str:
    """The stage a member comes from: meta (meta_<method> of src.meta.META_METHODS) or heads."""
    from src.meta import META_METHODS

    return "meta" if name.startswith(META_PREFIX) and name[len(META_PREFIX):] in META_METHODS else "heads"


def check_members(names: list[str]) -> None:
    from src.heads import HEADS
    from src.meta import META_METHODS

    if not names:
        raise UserError("--members: empty list")
    for name in names:
        if name not in HEADS and member_source(name) != "meta":
            raise UserError(f"--members: unknown member '{name}' (heads: {', '.join(HEADS.names())}; 04_meta "
                            f"methods: {', '.join(META_PREFIX + n for n in META_METHODS.names())})")
    if len(set(names)) != len(names):
        raise UserError(f"--members: a member is listed twice ({','.join(names)})")


def is_transductive(name: str) -> bool:
    from src.heads import HEADS

    return member_source(name) == "heads" and bool(HEADS.get(name).transductive)


@dataclass
class DrawInputs:
    """Everything the members of one draw read: the draw's competition view, its pseudo-labels and
    the heads' inputs. Built lazily: only what the requested members need."""

    cfg: Config
    data: CompetitionData  # relabel()-ed: only the support is labeled
    emb: np.ndarray  # (N, D) float32 SSL embeddings as 01_ssl wrote them (label-free)
    device: torch.device
    encoder: object = None  # the saved SSL encoder for the heads that fine-tune it (loads_saved_encoder), else None
    meta_encoder: object = None  # the saved SSL encoder for 04_meta's methods (meta.train_block), else None
    _pool: object = None
    _heads: object = None
    _table: object = None
    _folds: object = None
    _labels: object = None
    _meta: object = None
    context: object = None  # src.transductive.TransductiveContext over l2_normalize(emb): label-free, shared by draws
    graph: object = None  # 02_pseudo's labeler_input of emb (label-free: may be shared by draws); built when None
    trunk: object = None  # src.meta.base.TrunkCache of meta_encoder (label-free: may be shared by draws), or None

    def label_table(self, data: CompetitionData) -> pd.DataFrame:
        """02_pseudo round 0 seeded by `data`'s labels: its label table (image_id, label, confidence, selected)."""
        from src.stages.pseudo import label_round, labeler_input

        if self.graph is None:
            self.graph = labeler_input(self.cfg, self.emb, self.device)
        empty = np.zeros(0, np.int64)
        return label_round(self.cfg, data, self.graph, self.device, empty, empty, None)[0]

    def labels(self) -> pd.DataFrame:
        """The draw's own round-0 label table (label_table of the draw's support), computed once."""
        if self._labels is None:
            self._labels = self.label_table(self.data)
        return self._labels

    def round0(self, data: CompetitionData) -> pd.DataFrame:
        """02_pseudo round 0 seeded by `data`'s labels: the selected pseudo-labels (row, y, confidence)."""
        from src.stages.heads import pseudo_rows

        table = self.labels() if data is self.data else self.label_table(data)
        return pseudo_rows(table, data, self.cfg.heads.pseudo_min_confidence)

    def pool(self) -> pd.DataFrame:
        if self._pool is None:
            self._pool = self.round0(self.data)
        return self._pool

    def meta_inputs(self):
        """04_meta's inputs (src.stages.meta.MetaInputs) of the draw: its episode pool built from the
        draw's round-0 pseudo-labels, the SSL encoder (03_metric is not re-drawn, and the run's own
        metric encoder saw the run's labels)."""
        if self._meta is None:
            from src.paths import RunPaths
            from src.stages.meta import assemble_inputs, build_pool, needs_encoder

            pool = build_pool(self.cfg, RunPaths(self.cfg), self.data, "ssl", self.labels(), self.emb)
            if needs_encoder(self.cfg) and self.meta_encoder is None:
                raise UserError("re-draws: 04_meta's methods need the SSL encoder (meta.train_block), none was loaded")
            self._meta = assemble_inputs(self.cfg, self.data, "ssl", pool, self.device, self.meta_encoder,
                                         self.emb, verbose=False, trunk=self.trunk)
        return self._meta

    def folds(self) -> list:
        """pseudo.crossfit_folds as 02_pseudo and 05_heads run it (round 0 only: rounds are not
        re-drawn): per fold, round 0 again without the fold's labels; [] when off."""
        if self._folds is None:
            from src.stages.heads import crossfold
            from src.stages.pseudo import crossfit_spec

            self._folds = []
            if self.cfg.pseudo.crossfit_folds:
                h = self.head_inputs()
                fold, spec = crossfit_spec(self.data, self.cfg.pseudo.crossfit_folds)
                for k in range(spec["folds"]):
                    held = np.flatnonzero(fold == k)
                    pseudo = self.round0(self.data.without_labels(self.data.labeled_idx[held]))
                    self._folds.append(crossfold(self.cfg, self.data, held, h.x, self.context, pseudo, h, self.device))
        return self._folds

    def head_inputs(self):
        """The heads' inputs (src.stages.heads.HeadInputs) of the draw, without the stacker's rows."""
        if self._heads is None:
            from src.heads import l2_normalize
            from src.stages.heads import head_inputs

            x = l2_normalize(self.emb) if self.context is None else self.context.x
            self._heads = head_inputs(self.cfg, self.data, x, self.pool(), self.device, self.context)
        return self._heads

    def heads(self):
        """(heads' inputs, the stacker's rows) of the draw."""
        h = self.head_inputs()
        if self._table is None:
            from src.stages.heads import stack_rows

            self._table = stack_rows(self.cfg, h, self.pool(), h.x)
        return h, self._table


def member_outputs(name: str, inp: DrawInputs) -> dict:
    """{"probs" (T, C), "oof" (L, C), "stack" (R, C) | None} of one member on one draw."""
    from src.stages.heads import head_outputs

    if member_source(name) == "meta":
        from src.runtime import cpu_threads
        from src.stages.meta import run_method

        meta = inp.meta_inputs()
        with cpu_threads(meta.device, inp.cfg.meta.cpu_threads):
            _, probs, oof = run_method(name[len(META_PREFIX):], meta)  # LOO as 04_meta writes it
        return {"probs": probs, "oof": oof, "stack": None}
    h, table = inp.heads()
    out = head_outputs(name, inp.cfg, h, table, inp.encoder, inp.device, inp.folds())  # LOO as 05_heads writes it
    return {k: out[k] for k in ("probs", "oof", "stack")}


# ---------------------------------------------------------------------------------------------
# Scoring and aggregation (pure: tested on hand-made numbers)
# ---------------------------------------------------------------------------------------------
def apply_rules(members: Members, rules: list[str], params: RuleParams) -> dict[str, dict]:
    """rule -> {"test": (T, C), "oof": (L, C), "weights", "note"}; the rules see `members` only."""
    out = {}
    for name, c in ensemble_rules(rules, members, params).items():
        out[name] = {"test": c.test, "oof": c.oof, "weights": None if c.weights is None else c.weights.tolist(),
                     "note": c.note}
    return out


def score_draw(members: Members, combined: dict[str, dict], truth: np.ndarray,
               estimators: list[str] | None = None, params: RuleParams | None = None) -> dict:
    """Per member and rule: test accuracy against `truth` (T,) (rows of -1: not scored), local CV (LOO)
    with its Wilson interval, and every accuracy estimator of src/estimate.py (which sees the members,
    each ensemble.count_once family counted once as `params` says, and the labeled images, never `truth`)."""
    truth = np.asarray(truth)
    ctx = estimate_context(members, params or RuleParams())
    names = estimators if estimators is not None else ESTIMATORS.names()

    def one(test, oof):
        cv = cv_summary(oof, members.y)
        return {"truth": truth_accuracy(test, truth), "cv": cv["accuracy"],
                "cv_interval": cv["interval"], "estimates": estimate_all(test, oof, ctx, names)}

    rec = {"members": {n: one(p, o) for n, p, o in zip(members.names, members.probs, members.oof)},
           "rules": {r: {**one(c["test"], c["oof"]), "weights": c["weights"], "note": c["note"]}
                     for r, c in combined.items()}}
    return rec


def _stats(truth: list[float], cv: list[float], half: list[float]) -> dict:
    t, c = np.asarray(truth), np.asarray(cv)
    return {"mean": float(t.mean()), "std": float(t.std()), "worst": float(t.min()), "best": float(t.max()),
            "cv_mean": float(c.mean()), "cv_std": float(c.std()), "cv_halfwidth": float(np.mean(half)),
            "cv_minus_truth": float((c - t).mean()), "n_draws": int(len(t))}


def aggregate(draws: list[dict], default: str = "") -> dict:
    """Mean, std, worst case (min over draws) of test accuracy and local CV per member and rule, the
    best fixed member (highest mean accuracy: an oracle reference, it was chosen on truth) and the
    mean member (per draw, the average accuracy of the members), and per rule the paired per-draw
    differences to both; `passes` tests the issue's bars: mean >= best fixed member's mean - 0.5
    point and worst case >= mean member's worst case."""
    if not draws:
        raise UserError("re-draws: no draw to aggregate")
    names = list(draws[0]["members"])
    rules = list(draws[0]["rules"])

    def series(kind, name, key):
        return [d[kind][name][key] for d in draws]

    def half(kind, name):
        return [(d[kind][name]["cv_interval"][1] - d[kind][name]["cv_interval"][0]) / 2 for d in draws]

    members = {n: _stats(series("members", n, "truth"), series("members", n, "cv"), half("members", n)) for n in names}
    best = max(names, key=lambda n: (members[n]["mean"], -names.index(n)))
    mean_member = np.mean([series("members", n, "truth") for n in names], axis=0)  # (D,)
    mean_member_cv = np.mean([series("members", n, "cv") for n in names], axis=0)
    mean_member_half = np.mean([half("members", n) for n in names], axis=0)
    refs = {"best_fixed_member": {**members[best], "name": best},
            "mean_member": _stats(mean_member.tolist(), mean_member_cv.tolist(), mean_member_half.tolist())}
    best_series = np.asarray(series("members", best, "truth"))
    out_rules = {}
    for r in rules:
        t = np.asarray(series("rules", r, "truth"))
        s = _stats(t.tolist(), series("rules", r, "cv"), half("rules", r))
        s["vs_best_member"] = {"mean": float((t - best_series).mean()), "worst": float((t - best_series).min())}
        s["vs_mean_member"] = {"mean": float((t - mean_member).mean()), "worst": float((t - mean_member).min())}
        s["passes"] = bool(s["mean"] >= refs["best_fixed_member"]["mean"] - 0.005
                           and s["worst"] >= refs["mean_member"]["worst"])
        out_rules[r] = s
    return {"n_draws": len(draws), "members": members, "rules": out_rules, "references": refs, "default": default,
            "estimators": estimator_stats(draws, default)}


def estimator_stats(draws: list[dict], default: str = "") -> dict:
    """Per accuracy estimator, over every draw: on members and rules together, the mean and worst
    |estimate - truth|, the mean signed error (bias) and how often the interval held the truth
    (coverage); the same on the default rule alone; and the Spearman rank correlation with truth
    across the members of a draw (mean and worst over draws)."""
    from scipy.stats import spearmanr

    first = draws[0]["members"][next(iter(draws[0]["members"]))]
    out = {}
    for e in first.get("estimates", {}):
        err, hit, rule_err, rule_hit, rhos = [], [], [], [], []
        for d in draws:
            for kind in ("members", "rules"):
                for name, r in d[kind].items():
                    v = r["estimates"][e]
                    err.append(v["estimate"] - r["truth"])
                    hit.append(v["interval"][0] <= r["truth"] <= v["interval"][1])
                    if kind == "rules" and name == default:
                        rule_err.append(err[-1])
                        rule_hit.append(hit[-1])
            est = [r["estimates"][e]["estimate"] for r in d["members"].values()]
            tru = [r["truth"] for r in d["members"].values()]
            if len(est) > 2 and np.ptp(est) > 0 and np.ptp(tru) > 0:
                rhos.append(float(spearmanr(est, tru).statistic))
        err, rule_err = np.asarray(err), np.asarray(rule_err)
        out[e] = {"mean_abs": float(np.abs(err).mean()), "worst_abs": float(np.abs(err).max()),
                  "bias": float(err.mean()), "coverage": float(np.mean(hit)),
                  "rank_corr_mean": float(np.mean(rhos)) if rhos else None,
                  "rank_corr_worst": float(np.min(rhos)) if rhos else None,
                  "default_rule": None if not len(rule_err) else {
                      "mean_abs": float(np.abs(rule_err).mean()), "worst_abs": float(np.abs(rule_err).max()),
                      "bias": float(rule_err.mean()), "coverage": float(np.mean(rule_hit))}}
    return out


def format_markdown(agg: dict, title: str = "") -> str:
    """The re-draw table: per rule and member, test accuracy (truth) mean, std, worst over draws, the
    local CV (LOO) mean +- its std over draws beside it, and the paired difference to the best fixed member."""
    def pct(v):
        return f"{100 * v:.1f}"

    head = ("| rule / member | truth mean | std | worst | local CV mean ± re-draw std | Wilson ± (one draw) "
            "| CV − truth | Δ best member (mean / worst) | passes |")
    lines = [f"### {title}" if title else "", "", head, "|" + " --- |" * 9]
    default = agg.get("default", "")
    ranked = sorted(agg["rules"], key=lambda r: -agg["rules"][r]["mean"])
    for r in ranked:
        s = agg["rules"][r]
        name = f"**{r}** (default)" if r == default else r
        lines.append(f"| {name} | {pct(s['mean'])} | {pct(s['std'])} | {pct(s['worst'])} | "
                     f"{pct(s['cv_mean'])} ± {pct(s['cv_std'])} | ± {pct(s['cv_halfwidth'])} | "
                     f"{100 * s['cv_minus_truth']:+.1f} | {100 * s['vs_best_member']['mean']:+.1f} / "
                     f"{100 * s['vs_best_member']['worst']:+.1f} | {'yes' if s['passes'] else 'no'} |")
    refs = agg["references"]
    for key, label in (("best_fixed_member", f"best fixed member ({refs['best_fixed_member']['name']}, "
                                             "chosen on truth)"), ("mean_member", "mean member (per-draw average)")):
        s = refs[key]
        lines.append(f"| _{label}_ | {pct(s['mean'])} | {pct(s['std'])} | {pct(s['worst'])} | "
                     f"{pct(s['cv_mean'])} ± {pct(s['cv_std'])} | ± {pct(s['cv_halfwidth'])} | "
                     f"{100 * s['cv_minus_truth']:+.1f} | | |")
    for n in sorted(agg["members"], key=lambda n: -agg["members"][n]["mean"]):
        s = agg["members"][n]
        lines.append(f"| member {n} | {pct(s['mean'])} | {pct(s['std'])} | {pct(s['worst'])} | "
                     f"{pct(s['cv_mean'])} ± {pct(s['cv_std'])} | ± {pct(s['cv_halfwidth'])} | "
                     f"{100 * s['cv_minus_truth']:+.1f} | | |")
    est = agg.get("estimators") or {}
    if est:
        lines += ["", "| estimator | mean abs error | worst | bias | 95% interval coverage | rank corr. across members "
                  f"(mean / worst) | on {default or 'the default rule'}: mean abs / worst / coverage |",
                  "|" + " --- |" * 7]
        for e, v in sorted(est.items(), key=lambda kv: kv[1]["mean_abs"]):
            rc = "-" if v["rank_corr_mean"] is None else f"{v['rank_corr_mean']:.2f} / {v['rank_corr_worst']:.2f}"
            dr = v.get("default_rule")
            dtext = "-" if not dr else f"{pct(dr['mean_abs'])} / {pct(dr['worst_abs'])} / {100 * dr['coverage']:.0f} %"
            lines.append(f"| {e} | {pct(v['mean_abs'])} | {pct(v['worst_abs'])} | {100 * v['bias']:+.1f} | "
                         f"{100 * v['coverage']:.0f} % | {rc} | {dtext} |")
    lines += ["", f"{agg['n_draws']} support draws; accuracies in %; passes: mean ≥ best fixed member's mean − 0.5 and "
              "worst ≥ mean member's worst. Local CV: leave-one-out over the draw's 30 labeled images (nested where "
              "the rule reads labels); its std is over draws, the Wilson ± is the mean half-width of one draw's "
              "95% interval."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def _fingerprint(cfg: Config, paths: RunPaths, n_per_class: int, seed: int, pool_split: str = "train",
                 code: str = "", meta: bool = False) -> str:
    """The member cache's key: config sections (meta too when 04_meta methods are members), seeds,
    01_ssl's fingerprint and the code version (`code`, default the current commit)."""
    from src.runtime import git_commit

    ssl = io.read_json(paths.done_marker("ssl"))["fingerprint"]
    sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("data", "pseudo", "heads", "cv") + ("meta",) * meta}
    sections["cv"].pop("estimator")  # what is reported, not how members are computed
    blob = json.dumps({"sections": sections, "seed": cfg.run.seed,
                       "draw_seed": seed, "per_class": n_per_class, "ssl": ssl, "code": code or git_commit(),
                       **({"pool": pool_split} if pool_split != "train" else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(path: Path, arrays: dict[str, np.ndarray | None]) -> None:
    io.save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items() if v is not None})


def _load(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in io.load_tensors(path).items()}


TABLE_COLUMNS = ("row", "y", "weight", "group", "fold", "labeled")


def encoder_configs(cfg: Config, seeds: list[int] | None) -> list[Config]:
    """One config per encoder seed: run.seed = s and, for a seed other than the run's own, run.name =
    <name>-seed<s> (its own 00_prepare and 01_ssl outputs). None or []: the run's own encoder only."""
    import copy

    out = []
    for s in seeds or [cfg.run.seed]:
        c = copy.deepcopy(cfg)
        if s != cfg.run.seed:
            c.run.seed, c.run.name = int(s), f"{cfg.run.name}-seed{s}"
        out.append(c)
    if len({c.run.seed for c in out}) != len(out):
        raise UserError(f"--encoder-seeds: a seed is listed twice ({','.join(str(c.run.seed) for c in out)})")
    return out


def train_encoder(cfg: Config) -> None:
    """00_prepare and 01_ssl of `cfg` (each skipped when its outputs are up to date)."""
    from src.stages import get_stage, run_stage

    for key in ("prepare", "ssl"):
        run_stage(get_stage(key), cfg)


def run_redraws(cfg: Config, n_draws: int = 30, members: list[str] | None = None, rules: list[str] | None = None,
                default: str = "", seed: int = 0, labels_csv: str = "", n_train: int = 2, n_val: int = 1,
                fresh: bool = False, encoder_seeds: list[int] | None = None, pool_split: str = "train",
                cache_commit: str = "") -> dict:
    """Draw supports, compute (or load) every member per draw, apply every rule, score members, rules
    and accuracy estimators against truth, aggregate; writes results.json and table.md under
    paths.redraw_dir of `cfg`'s run. Returns the aggregate.

    encoder_seeds: train one encoder per seed (encoder_configs; 00_prepare and 01_ssl run where their
    outputs are missing) and draw the same supports on each, so the table holds the encoder's
    variance as well as the support's. pool_split: where supports come from: "train" (the non-test
    images of known label: never a scored image) or "test" (test images of known label: each draw's
    support leaves the scored set; for a competition whose only labels beyond the support are test ones).
    cache_commit: read the members from the cache written at that commit (full hash, as git rev-parse
    HEAD prints it; "+dirty" if the tree had changes) instead of the current one, and compute none:
    for rescoring cached members after a change to the rules or estimators only."""
    from threadpoolctl import threadpool_limits

    paths = RunPaths(cfg)
    members = list(members or cfg.heads.heads)
    check_members(members)
    from src.stages.submit import validate as validate_ensemble

    validate_ensemble(cfg)  # cv.estimator and the ensemble.* keys the rules read (count_once, ...), as 06_submit checks them
    params = RuleParams.from_config(cfg.ensemble, cfg.run.seed, cfg.cv.estimator)
    if not rules:  # every rule that can run on these members
        trans, pref = any(is_transductive(n) for n in members), any(n in members for n in params.preferred)
        rules = [r for r in RULES if (r != "transductive" or trans) and (r not in PREFERRED_RULES or pref)]
    rules = list(rules)
    for r in rules:
        check_rule(r, "--rules")
    default = default or cfg.ensemble.method
    if n_draws < 1:
        raise UserError(f"--draws: must be >= 1, got {n_draws}")
    if pool_split not in ("train", "test"):
        raise UserError(f"--pool: expected train or test, got '{pool_split}'")
    if cache_commit and fresh:
        raise UserError("--cache-commit: reads an earlier commit's cache; --fresh would recompute it")
    cfgs = encoder_configs(cfg, encoder_seeds)
    records, t0 = [], time.perf_counter()
    with threadpool_limits(1):
        for c in cfgs:
            if len(cfgs) > 1:
                with threadpool_limits(None):
                    train_encoder(c)
            for rec in encoder_records(c, n_draws, members, rules, params, seed, labels_csv, n_train, n_val,
                                       fresh, pool_split, t0, cache_commit):
                records.append(rec | {"encoder_seed": c.run.seed})
    add_seed_disagreement(records)
    agg = aggregate(records, default)
    agg |= {"members_list": members, "rules_list": rules, "seed": seed, "support_per_class": [n_train, n_val],
            "encoder_seeds": [c.run.seed for c in cfgs], "encoder_runs": [c.run.name for c in cfgs],
            "draws_per_encoder": n_draws, "pool_split": pool_split, "run": cfg.run.name,
            "seconds": round(time.perf_counter() - t0, 1),
            "not_redrawn": ["SSL embeddings (label-free, shared by every draw of one encoder seed)", "02_pseudo "
                            "self-training rounds (round 0 only)", "03_metric embeddings (heads read the SSL "
                            "embeddings)", "04_meta's encoder (the SSL encoder, not 03_metric's)"
                            if any(member_source(n) == "meta" for n in members) else "04_meta methods (not members)"]}
    io.write_json(paths.redraw_dir / "results.json", {"aggregate": agg, "draws": records})
    title = (f"Re-draw evaluation: run {cfg.run.name}, {len(cfgs)} encoder seed(s) x {n_draws} draws, "
             f"draw seed {seed}, supports from the {pool_split} images")
    md = format_markdown(agg, title)
    io.write_text(paths.redraw_dir / "table.md", md + "\n")
    print(md)
    print(f"written: {paths.redraw_dir / 'results.json'}, {paths.redraw_dir / 'table.md'}")
    return agg


SEED_GDE = "disagreement_seeds"


def add_seed_disagreement(records: list[dict]) -> None:
    """GDE (Jiang et al. 2022) with truly independent copies: the estimate of a member or rule on one
    encoder seed's draw is its agreement on the test images with the same member or rule on the same
    draw (same support) of every other encoder seed; added to each record's estimates as
    ``disagreement_seeds`` when there are two seeds or more. Reads and then drops every record's
    ``_pred`` (test rows and argmaxes), which results.json does not keep."""
    preds = [rec.pop("_pred") for rec in records]
    if len({rec["encoder_seed"] for rec in records}) < 2:
        return
    twins = [[q for other, q in zip(records, preds) if other["draw"] == rec["draw"]
              and other["encoder_seed"] != rec["encoder_seed"] and np.array_equal(q["rows"], pred["rows"])]
             for rec, pred in zip(records, preds)]
    if not all(twins):  # every record gets the estimate or none does (the tables read it on every row)
        print(f"note: {SEED_GDE} not scored: the encoder seeds' runs do not share their test rows")
        return
    for rec, pred, copies in zip(records, preds, twins):
        for kind in ("members", "rules"):
            for name, z in pred[kind].items():
                est = gde_estimate(z, [q[kind][name] for q in copies])
                rec[kind][name]["estimates"][SEED_GDE] = est.as_dict()


MERGE_KEYS = ("members_list", "rules_list", "seed", "support_per_class", "pool_split", "draws_per_encoder")


def merge_redraws(cfg: Config, runs: list[str]) -> dict:
    """One table over encoders whose re-draws ran as separate commands (at other commits, from other
    caches): the draws of `cfg`'s run and of each run in `runs`, read from their redraw/results.json.
    They must share members, rules, draw seed, pool, support shape and draws per encoder, the very
    supports of every draw (paired draws, as --encoder-seeds draws them) and the estimators, and
    come from distinct encoder seeds. Aggregated as one run over several encoder seeds is, less
    the seeds' disagreement (results.json keeps no test argmaxes). Writes results.json and table.md
    under redraw/merged/ of `cfg`'s run; computes nothing."""
    import copy

    names = [cfg.run.name, *runs]
    if len(set(names)) != len(names):
        raise UserError(f"--merge: a run is listed twice ({','.join(names)})")
    loaded = []
    for name in names:
        c = copy.deepcopy(cfg)
        c.run.name = name
        path = RunPaths(c).redraw_dir / "results.json"
        if not path.is_file():
            raise UserError(f"--merge: {path} not found (run redraw.py on run '{name}' first)")
        loaded.append((path, io.read_json(path)))
    (path0, first), seeds = loaded[0], {}
    support0 = {d["draw"]: d["support"] for d in first["draws"]}
    for path, res in loaded:
        agg = res["aggregate"]
        for key in MERGE_KEYS:
            if agg.get(key) != first["aggregate"].get(key):
                raise UserError(f"--merge: {path}: {key} is {agg.get(key)} where {path0} has "
                                f"{first['aggregate'].get(key)}")
        for s in agg["encoder_seeds"]:
            if s in seeds:
                raise UserError(f"--merge: encoder seed {s} is in {seeds[s]} and in {path}")
            seeds[s] = path
        if set(agg["estimators"]) - {SEED_GDE} != set(first["aggregate"]["estimators"]) - {SEED_GDE}:
            raise UserError(f"--merge: {path}: its estimators differ from {path0}'s (rescore both at one "
                            "commit with --cache-commit)")
        for d in res["draws"]:
            if d["support"] != support0.get(d["draw"]):
                raise UserError(f"--merge: {path}: draw {d['draw']}'s support differs from {path0}'s "
                                "(the runs need the same --seed, --pool and --labels)")
    records = []
    for _, res in loaded:
        for d in res["draws"]:
            records.append(copy.deepcopy(d))
            for kind in ("members", "rules"):
                for r in records[-1][kind].values():
                    r["estimates"].pop(SEED_GDE, None)  # scored within one run's seeds only
    agg = aggregate(records, cfg.ensemble.method)
    agg |= {k: first["aggregate"][k] for k in MERGE_KEYS}
    runs_of = [r for _, res in loaded for r in res["aggregate"]["encoder_runs"]]
    agg |= {"encoder_seeds": list(seeds), "encoder_runs": runs_of, "merged_from": [str(p) for p, _ in loaded],
            "run": cfg.run.name}
    out = RunPaths(cfg).redraw_merged_dir
    io.write_json(out / "results.json", {"aggregate": agg, "draws": records})
    title = (f"Re-draw evaluation: runs {', '.join(agg['encoder_runs'])}, {len(seeds)} encoder seed(s) x "
             f"{agg['draws_per_encoder']} draws, draw seed {agg['seed']}, supports from the {agg['pool_split']} images")
    md = format_markdown(agg, title)
    io.write_text(out / "table.md", md + "\n")
    print(md)
    print(f"written: {out / 'results.json'}, {out / 'table.md'}")
    return agg


def encoder_records(cfg: Config, n_draws: int, members: list[str], rules: list[str], params: RuleParams, seed: int,
                    labels_csv: str, n_train: int, n_val: int, fresh: bool, pool_split: str, t0: float,
                    cache_commit: str = ""):
    """Scored records of every draw on the SSL embeddings of `cfg`'s run (one encoder)."""
    from src.runtime import resolve_device

    paths = RunPaths(cfg)
    for f in (paths.done_marker("ssl"), paths.embeddings("ssl")):
        if not f.exists():
            raise UserError(f"{f}: not found (run pipelines/00_prepare.py and 01_ssl.py first)")
    data = load_data(paths)
    labels = known_labels(cfg, data, labels_csv)
    emb = io.read_npy(paths.embeddings("ssl")).astype(np.float32)
    if emb.ndim != 2 or len(emb) != len(data.index):
        raise UserError(f"{paths.embeddings('ssl')}: shape {emb.shape}, expected ({len(data.index)}, D)")
    test = data.test_idx
    known = labels >= 0
    if not known[test].any():
        raise UserError("re-draws: no test image has a known label")
    if pool_split == "train":
        if not known[test].all():
            raise UserError(f"re-draws: {int((~known[test]).sum())} test images have no known label "
                            "(--pool test draws supports from the labeled test images and scores the rest)")
        pool = np.setdiff1d(np.flatnonzero(known), test)  # never a scored image in a support
    else:
        pool = test[known[test]]
    supports = draw_supports(pool, labels[pool], data.n_classes, n_train + n_val, n_draws, seed)
    from src.heads import l2_normalize, loads_saved_encoder
    from src.stages.meta import needs_encoder

    device = resolve_device(cfg.run.device)
    with_meta = any(member_source(n) == "meta" for n in members)
    for_heads, for_meta = loads_saved_encoder(cfg.heads, members), with_meta and needs_encoder(cfg)
    loaded = None
    if for_heads or for_meta:
        from src.models.encoder import load_encoder

        loaded = load_encoder(paths.encoder("ssl"), paths.encoder_spec("ssl"), device)
    encoder = loaded if for_heads else None  # a head handed an encoder fine-tunes it: only when configured
    meta_encoder = loaded if for_meta else None
    cache = paths.redraw_dir / "cache" / _fingerprint(cfg, paths, n_train + n_val, seed, pool_split, cache_commit,
                                                      with_meta)
    if cache_commit and not cache.is_dir():
        raise UserError(f"--cache-commit {cache_commit}: no member cache of this config and run at that commit "
                        f"({cache.parent})")
    if fresh and cache.exists():
        import shutil

        shutil.rmtree(cache)
    print(f"re-draws on run {cfg.run.name} (encoder seed {cfg.run.seed}): {n_draws} supports of {n_train}+{n_val} "
          f"per class from {len(pool)} {pool_split} images of known label; members {', '.join(members)}; "
          f"rules {', '.join(rules)}")
    from src.meta.base import TrunkCache
    from src.stages.pseudo import labeler_input
    from src.transductive import TransductiveContext

    # What no label changes is built once and shared by the draws, each part on first use: the heads'
    # kNN graph, 02_pseudo's, and the trunk features of 04_meta's encoder.
    context = TransductiveContext(l2_normalize(emb), device)
    graph = labeler_input(cfg, emb, device)
    trunk = (TrunkCache(meta_encoder, data.images, device, cfg.meta.batch_size, cfg.run.precision)
             if meta_encoder is not None else None)
    for d in tqdm(range(n_draws), desc="draws", disable=not cfg.run.progress):
        m, scored = draw_members(cfg, data, emb, labels, supports[d], members, device, encoder,
                                 cache / f"draw_{d:03d}", context, read_only=bool(cache_commit),
                                 meta_encoder=meta_encoder, graph=graph, trunk=trunk)
        combined = apply_rules(m, rules, params)
        rec = score_draw(m, combined, labels[scored], params=params)
        rec |= {"draw": d, "support": supports[d].tolist(), "n_scored": int((labels[scored] >= 0).sum()),
                "_pred": {"rows": scored, "members": {n: p.argmax(1) for n, p in zip(m.names, m.probs)},
                          "rules": {r: c["test"].argmax(1) for r, c in combined.items()}}}
        if not cfg.run.progress:
            best = max(rec["members"], key=lambda n: rec["members"][n]["truth"])
            print(f"  draw {d}: best member {best} {rec['members'][best]['truth']:.3f}; "
                  + ", ".join(f"{r} {rec['rules'][r]['truth']:.3f}" for r in rules)
                  + f"  ({time.perf_counter() - t0:.0f}s)")
        yield rec


def draw_members(cfg: Config, data: CompetitionData, emb: np.ndarray, labels: np.ndarray, support: np.ndarray,
                 names: list[str], device, encoder, cache: Path, context=None,
                 read_only: bool = False, meta_encoder=None, graph=None, trunk=None) -> tuple[Members, np.ndarray]:
    """Members of one draw, from the cache where present, and the rows (T,) their test probabilities
    score. Only support rows' labels are passed on. encoder / meta_encoder: the saved SSL encoder for
    the heads that fine-tune it and for 04_meta's methods, or None. context: the transductive heads'
    TransductiveContext (label-free: one for every draw) or None; graph / trunk: 02_pseudo's labeler input
    and 04_meta's TrunkCache, shared by the draws in the same way (DrawInputs). read_only: a member missing from
    the cache is an error (an earlier commit's cache: nothing is computed or written into it)."""
    data_d = relabel(data, support, labels)
    inp = DrawInputs(cfg, data_d, emb, device, encoder, meta_encoder, context=context, graph=graph, trunk=trunk)
    table = None
    table_file = cache / "table.safetensors"
    if table_file.exists():
        t = _load(table_file)
        table = pd.DataFrame({k: t[k] for k in TABLE_COLUMNS})
        table["labeled"] = table["labeled"].astype(bool)
    outs = {}
    for name in names:
        f = cache / f"{name}.safetensors"
        if f.exists():
            outs[name] = _load(f)
            continue
        if read_only:
            raise UserError(f"--cache-commit: {f} not found (member '{name}' was not computed at that commit "
                            "for this draw; lower --draws or leave it out of --members)")
        outs[name] = member_outputs(name, inp)
        _save(f, outs[name])
        if table is None:
            table = inp.heads()[1]
            _save(table_file, {k: table[k].to_numpy().astype(np.float64 if k == "weight" else np.int64)
                               for k in TABLE_COLUMNS})
    y = data_d.class_ids[data_d.labeled_idx]
    return Members(names=list(names), oof=[outs[n]["oof"] for n in names], probs=[outs[n]["probs"] for n in names],
                   y=y, transductive=[is_transductive(n) for n in names],
                   stack=[outs[n].get("stack") for n in names], table=table,
                   sources=[member_source(n) for n in names]), data_d.test_idx
