"""The re-draw evaluator's bookkeeping (src/selection.py): draw shapes and per-class counts, the
scored images never in a support, only the support's labels reach the members, the rules never
see truth (scrambled-truth spy), the aggregation against hand-computed numbers, the CLI's errors."""
import json

import numpy as np
import pytest
import torch

from conftest import run_script
from src import io, selection
from src.data.digits import digits_layout
from src.errors import UserError
from src.estimate import ESTIMATORS
from test_report import make_run, truth_comp  # noqa: F401  (fixture)

DIGITS = ["data.builder=digits", "data.demo_test_size=200"]  # how conftest's digits folder was built


def test_draw_supports_shapes_counts_pool_and_seed():
    rng = np.random.default_rng(0)
    pool_y = rng.integers(0, 4, 200)
    pool = np.sort(rng.choice(np.arange(1000, 5000), 200, replace=False))  # rows: not 0..199
    draws = selection.draw_supports(pool, pool_y, 4, 3, n_draws=25, seed=7)
    assert draws.shape == (25, 12) and draws.dtype == np.int64
    y_of = dict(zip(pool, pool_y))
    for d in draws:
        assert set(d) <= set(pool) and len(set(d)) == 12  # from the pool, no row twice
        assert np.bincount([y_of[r] for r in d], minlength=4).tolist() == [3, 3, 3, 3]
    assert len({tuple(sorted(d)) for d in draws}) == 25  # the draws differ
    np.testing.assert_array_equal(draws, selection.draw_supports(pool, pool_y, 4, 3, 25, seed=7))  # seeded
    np.testing.assert_array_equal(draws[:5], selection.draw_supports(pool, pool_y, 4, 3, 5, seed=7))  # prefix
    assert not np.array_equal(draws, selection.draw_supports(pool, pool_y, 4, 3, 25, seed=8))
    with pytest.raises(UserError, match="class 3 has 2 non-test images"):
        selection.draw_supports(np.arange(11), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]), 4, 3, 1, 0)


def test_known_labels_and_relabel_on_the_digits_competition(truth_comp, tmp_path):  # noqa: F811
    cfg, paths, _ = make_run(truth_comp, tmp_path, pseudo=False, extra=DIGITS)
    from src.data import load_data

    data = load_data(paths)
    labels = selection.known_labels(cfg, data)
    layout = digits_layout(200, 0).set_index("image_id")
    want = layout.loc[data.index["image_id"], "label"].to_numpy()
    np.testing.assert_array_equal(data.classes[labels], want)  # every image, as the builder placed it
    np.testing.assert_array_equal(labels[data.labeled_idx], data.class_ids[data.labeled_idx])
    # a folder built otherwise (other test size) is refused
    other = cfg
    other.data.demo_test_size = 300
    with pytest.raises(UserError, match="differs from the competition's"):
        selection.known_labels(other, data)
    other.data.demo_test_size, other.data.builder = 200, ""
    with pytest.raises(UserError, match="only the digits builder knows them"):
        selection.known_labels(other, data)

    support = np.flatnonzero((labels >= 0) & ~np.isin(np.arange(len(labels)), data.test_idx))[:40]
    view = selection.relabel(data, support, labels)
    np.testing.assert_array_equal(view.labeled_idx, np.sort(support))
    np.testing.assert_array_equal(view.class_ids[view.labeled_idx], labels[np.sort(support)])
    outside = np.setdiff1d(np.arange(len(labels)), support)
    assert (view.index["label"].to_numpy()[outside] == -1).all()  # no other label survives, test ones included
    assert set(data.labeled_idx) - set(support) <= set(view.unlabeled_idx)
    assert view.classes.tolist() == data.classes.tolist() and view.images is data.images


def test_aggregate_hand_made_case():
    def rec(m, r):
        return {"members": {k: {"truth": v, "cv": c, "cv_interval": [c - 0.1, c + 0.1]} for k, (v, c) in m.items()},
                "rules": {k: {"truth": v, "cv": c, "cv_interval": [c - 0.2, c + 0.2]} for k, (v, c) in r.items()}}

    draws = [rec({"a": (0.9, 0.8), "b": (0.7, 0.9)}, {"mean": (0.85, 0.9), "pick": (0.7, 0.9)}),
             rec({"a": (0.8, 0.8), "b": (0.8, 0.7)}, {"mean": (0.80, 0.8), "pick": (0.8, 0.8)}),
             rec({"a": (0.7, 0.6), "b": (0.6, 0.6)}, {"mean": (0.70, 0.6), "pick": (0.6, 0.6)})]
    agg = selection.aggregate(draws, default="mean")
    a = agg["members"]["a"]
    assert a["mean"] == pytest.approx(0.8) and a["worst"] == pytest.approx(0.7)
    assert a["std"] == pytest.approx(np.std([0.9, 0.8, 0.7])) and a["cv_mean"] == pytest.approx(0.7333333)
    assert a["cv_halfwidth"] == pytest.approx(0.1) and a["cv_minus_truth"] == pytest.approx(-0.0666667)
    refs = agg["references"]
    assert refs["best_fixed_member"]["name"] == "a" and refs["best_fixed_member"]["mean"] == pytest.approx(0.8)
    # mean member per draw: 0.8, 0.8, 0.65
    assert refs["mean_member"]["mean"] == pytest.approx(0.75) and refs["mean_member"]["worst"] == pytest.approx(0.65)
    mean = agg["rules"]["mean"]
    assert mean["mean"] == pytest.approx(0.7833333) and mean["worst"] == pytest.approx(0.7)
    assert mean["vs_best_member"] == pytest.approx({"mean": (-0.05 + 0 + 0) / 3, "worst": -0.05})
    assert mean["vs_mean_member"] == pytest.approx({"mean": (0.05 + 0 + 0.05) / 3, "worst": 0.0})
    assert mean["cv_halfwidth"] == pytest.approx(0.2)
    # mean: 0.783 < 0.8 - 0.005 fails the first bar although its worst case (0.70) beats 0.65
    assert mean["passes"] is False
    pick = agg["rules"]["pick"]  # 0.7, 0.8, 0.6: mean 0.7, worst 0.6 < 0.65
    assert pick["mean"] == pytest.approx(0.7) and pick["passes"] is False
    draws[0]["rules"]["mean"]["truth"] = 0.9  # now 0.8 mean, worst 0.7: passes both bars
    assert selection.aggregate(draws)["rules"]["mean"]["passes"] is True
    md = selection.format_markdown(selection.aggregate(draws, default="mean"))
    assert "| **mean** (default) | 80.0 |" in md and "best fixed member (a, chosen on truth)" in md


def test_seed_disagreement_pairs_each_draw_with_the_same_draw_of_the_other_seeds():
    """GDE over encoder seeds: a member's estimate on (seed s, draw d) is its mean agreement with the
    same member on draw d of the other seeds; its interval the lowest and highest of those."""
    rows = np.arange(4)
    preds = {(0, 0): [0, 1, 2, 3], (1, 0): [0, 1, 2, 0], (2, 0): [0, 0, 0, 0],
             (0, 1): [1, 1, 1, 1], (1, 1): [1, 1, 0, 0], (2, 1): [1, 1, 1, 1]}

    def rec(seed, draw):
        z = np.array(preds[seed, draw])
        return {"encoder_seed": seed, "draw": draw, "members": {"a": {"estimates": {}}},
                "rules": {"r": {"estimates": {}}},
                "_pred": {"rows": rows, "members": {"a": z}, "rules": {"r": (z + 1) % 4}}}

    records = [rec(s, d) for s in range(3) for d in range(2)]
    selection.add_seed_disagreement(records)
    got = {(r["encoder_seed"], r["draw"]): r["members"]["a"]["estimates"][selection.SEED_GDE] for r in records}
    assert got[0, 0] == {"estimate": pytest.approx((0.75 + 0.25) / 2), "interval": [0.25, 0.75]}
    assert got[2, 0] == {"estimate": pytest.approx((0.25 + 0.5) / 2), "interval": [0.25, 0.5]}
    assert got[1, 1] == {"estimate": pytest.approx(0.5), "interval": [0.5, 0.5]}
    assert got[0, 1] == {"estimate": pytest.approx(0.75), "interval": [0.5, 1.0]}
    assert all(r["rules"]["r"]["estimates"][selection.SEED_GDE] == got[r["encoder_seed"], r["draw"]] for r in records)
    assert not any("_pred" in r for r in records)
    one_seed = [rec(0, 0), rec(0, 1)]  # one encoder: nothing to pair, nothing added
    selection.add_seed_disagreement(one_seed)
    assert all(r["members"]["a"]["estimates"] == {} and "_pred" not in r for r in one_seed)
    odd = [rec(0, 0), rec(1, 0)]  # the seeds' test rows differ: no record gets the estimate
    odd[1]["_pred"]["rows"] = rows + 1
    selection.add_seed_disagreement(odd)
    assert all(r["members"]["a"]["estimates"] == {} for r in odd)


@pytest.fixture
def redraw_run(truth_comp, tmp_path):  # noqa: F811
    """A digits run with fake SSL embeddings (PCA of pixels) and cheap members and rules."""
    return make_run(truth_comp, tmp_path, pseudo=False,
                    extra=[*DIGITS, "heads.heads=[protonet,knn]", "pseudo.labelers=[prototype]",
                           "cv.stack_max_pseudo=100"])


MEMBERS = ["protonet", "knn", "propagation", "meta_siamese"]
RULES = ["mean", "best", "agreement", "transductive", "preferred", "top", "gated", "auto"]


def test_redraws_never_show_truth_to_members_or_rules(redraw_run, monkeypatch):
    _, paths, overrides = redraw_run
    from src.config import load_config
    from src.data import load_data

    cfg = load_config(None, [*overrides, *META])  # a 04_meta method among the members (meta_siamese)

    data = load_data(paths)
    seen = []
    real_member_outputs, real_score = selection.member_outputs, selection.score_draw

    def member_spy(name, inp):
        labels = inp.data.index["label"].to_numpy()
        seen.append((name, np.flatnonzero(labels >= 0)))
        return real_member_outputs(name, inp)

    outputs = []

    def score_spy(members, combined, truth, *args, **kwargs):
        outputs.append({r: c["test"].copy() for r, c in combined.items()}
                       | {m: p.copy() for m, p in zip(members.names, members.probs)})
        return real_score(members, combined, truth, *args, **kwargs)

    monkeypatch.setattr(selection, "member_outputs", member_spy)
    monkeypatch.setattr(selection, "score_draw", score_spy)
    agg = selection.run_redraws(cfg, n_draws=2, members=MEMBERS, rules=RULES, seed=1)
    results = io.read_json(paths.redraw_dir / "results.json")
    supports = [np.array(d["support"]) for d in results["draws"]]
    assert len(seen) == 2 * len(MEMBERS)
    for k, (name, labeled) in enumerate(seen):  # each member saw exactly its draw's support labeled
        np.testing.assert_array_equal(labeled, np.sort(supports[k // len(MEMBERS)]))
    for s in supports:
        assert len(s) == 3 * data.n_classes and not set(s) & set(data.test_idx)
    assert agg["n_draws"] == 2 and set(agg["rules"]) == set(RULES) and set(agg["members"]) == set(MEMBERS)
    assert (paths.redraw_dir / "table.md").read_text().count("| member ") == len(MEMBERS)

    # Scrambled truth: the same members and rule outputs, only the scores move.
    real_labels = selection.known_labels
    rng = np.random.default_rng(0)

    def scrambled(cfg_, data_, labels_csv=""):
        labels = real_labels(cfg_, data_, labels_csv)
        labels[data_.test_idx] = rng.permutation(labels[data_.test_idx])
        return labels

    monkeypatch.setattr(selection, "known_labels", scrambled)
    before, outputs[:] = list(outputs), []
    agg2 = selection.run_redraws(cfg, n_draws=2, members=MEMBERS, rules=RULES, seed=1, fresh=True)
    for b, a in zip(before, outputs):
        assert b.keys() == a.keys()
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])
    assert agg2["rules"]["mean"]["mean"] != agg["rules"]["mean"]["mean"]
    assert agg2["rules"]["mean"]["cv_mean"] == agg["rules"]["mean"]["cv_mean"]  # local CV reads no truth
    draws2 = io.read_json(paths.redraw_dir / "results.json")["draws"]
    for d1, d2 in zip(results["draws"], draws2):  # neither do the accuracy estimators
        for kind in ("members", "rules"):
            for name in d1[kind]:
                assert d1[kind][name]["estimates"] == d2[kind][name]["estimates"], (kind, name)
    assert set(agg["estimators"]) == set(ESTIMATORS.names())


def test_redraw_cache_and_cli(redraw_run, capsys):
    cfg, paths, overrides = redraw_run
    code, err = run_script("redraw.py", *overrides, "--draws", "2", "--members", "protonet,knn", "--rules", "mean,best",
                           capsys=capsys)
    assert code == 0, err
    first = json.loads((paths.redraw_dir / "results.json").read_text())
    cached = list((paths.redraw_dir / "cache").rglob("*.safetensors"))
    assert {p.name for p in cached} == {"protonet.safetensors", "knn.safetensors", "table.safetensors"}
    stamp = {p: p.stat().st_mtime_ns for p in cached}
    code, err = run_script("redraw.py", *overrides, "--draws", "2", "--members", "protonet,knn", "--rules",
                           "mean,best,weighted", capsys=capsys)
    assert code == 0, err
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # members reused from the cache
    second = json.loads((paths.redraw_dir / "results.json").read_text())
    assert second["aggregate"]["rules"]["mean"] == first["aggregate"]["rules"]["mean"]
    # --cache-commit: the cache of a named commit (here the current one) is read, and nothing computed
    from src.runtime import git_commit

    code, err = run_script("redraw.py", *overrides, "--draws", "2", "--members", "protonet,knn", "--rules", "mean",
                           "--cache-commit", git_commit(), capsys=capsys)
    assert code == 0, err
    assert json.loads((paths.redraw_dir / "results.json").read_text())["aggregate"]["rules"]["mean"] == \
        first["aggregate"]["rules"]["mean"]
    for args, message in ((["--cache-commit", "0" * 40], "no member cache of this config"),
                          (["--cache-commit", git_commit(), "--members", "protonet,logreg"],
                           "member 'logreg' was not computed at that commit"),
                          (["--cache-commit", git_commit(), "--fresh"], "--fresh would recompute it")):
        code, err = run_script("redraw.py", *overrides, "--draws", "2", *args, capsys=capsys)
        assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert {p.name for p in (paths.redraw_dir / "cache").rglob("*.safetensors")} == {p.name for p in cached}
    for args, message in ((["--members", "protonet,nope"], "unknown member 'nope'"),
                          (["--rules", "mean,nope"], "--rules: unknown rule 'nope'"),
                          (["--draws", "0"], "--draws: must be >= 1"),
                          (["ensemble.count_once=[metas]"], "ensemble.count_once: expected stages among"),
                          (["data.builder="], "only the digits builder knows them")):
        code, err = run_script("redraw.py", *overrides, *args, capsys=capsys)
        assert code == 2 and message in err, err


def test_encoder_configs_seed_bookkeeping(redraw_run):
    cfg, _, _ = redraw_run
    own = cfg.run.seed
    cfgs = selection.encoder_configs(cfg, [own, own + 1, own + 2])
    assert [c.run.seed for c in cfgs] == [own, own + 1, own + 2]
    assert [c.run.name for c in cfgs] == [cfg.run.name, f"{cfg.run.name}-seed{own + 1}", f"{cfg.run.name}-seed{own + 2}"]
    assert cfg.run.name == cfgs[0].run.name and cfg.run.seed == own  # the caller's config is untouched
    assert [c.run.name for c in selection.encoder_configs(cfg, None)] == [cfg.run.name]
    with pytest.raises(UserError, match="--encoder-seeds: a seed is listed twice"):
        selection.encoder_configs(cfg, [1, 1])


def test_redraws_over_encoder_seeds_and_test_pool(redraw_run, monkeypatch, capsys):
    """Two encoder seeds: the second trains its own 01_ssl run (stubbed here: a copy of the first's
    outputs under its run name), the same supports are drawn on both, records carry their seed. With
    --pool test the supports come from labeled test images and leave the scored set."""
    import shutil

    cfg, paths, overrides = redraw_run
    trained = []

    def fake_train(c):
        trained.append(c.run.name)
        target = selection.RunPaths(c).run
        if not target.exists():
            shutil.copytree(paths.run, target, ignore=shutil.ignore_patterns("redraw"))

    monkeypatch.setattr(selection, "train_encoder", fake_train)
    agg = selection.run_redraws(cfg, n_draws=2, members=["protonet", "knn"], rules=["mean"], seed=3,
                                encoder_seeds=[cfg.run.seed, cfg.run.seed + 5])
    assert trained == [cfg.run.name, f"{cfg.run.name}-seed{cfg.run.seed + 5}"]
    draws = io.read_json(paths.redraw_dir / "results.json")["draws"]
    assert [d["encoder_seed"] for d in draws] == [cfg.run.seed] * 2 + [cfg.run.seed + 5] * 2
    assert [d["support"] for d in draws[:2]] == [d["support"] for d in draws[2:]]  # paired draws
    assert agg["n_draws"] == 4 and agg["encoder_seeds"] == [cfg.run.seed, cfg.run.seed + 5]
    # the stub's second encoder is a copy of the first: every member and rule agrees with its twin everywhere
    for d in draws:
        assert "_pred" not in d
        for kind in ("members", "rules"):
            for name, r in d[kind].items():
                assert r["estimates"][selection.SEED_GDE] == {"estimate": 1.0, "interval": [1.0, 1.0]}, name
    assert agg["estimators"][selection.SEED_GDE]["bias"] == pytest.approx(
        1 - np.mean([r["truth"] for d in draws for k in ("members", "rules") for r in d[k].values()]))

    from src.data import load_data

    data = load_data(paths)
    agg = selection.run_redraws(cfg, n_draws=2, members=["protonet", "knn"], rules=["mean"], seed=3, pool_split="test")
    draws = io.read_json(paths.redraw_dir / "results.json")["draws"]
    assert set(agg["estimators"]) == set(ESTIMATORS.names())  # one encoder: no seed disagreement
    for d in draws:
        assert set(d["support"]) <= set(data.test_idx)  # drawn from the labeled test images
        assert d["n_scored"] == len(data.test_idx) - len(d["support"])  # and not scored
    code, err = run_script("redraw.py", *overrides, "--encoder-seeds", "1,x", capsys=capsys)
    assert code == 2 and "--encoder-seeds: expected comma-separated integers" in err, err


def test_merge_joins_runs_redraws_and_checks_they_pair(redraw_run, capsys):
    """--merge: the draws of the run and of the named runs in one table (redraw/merged/), aggregated as
    the concatenated records, the seeds kept apart; runs that do not pair exit 2 with one line and
    write nothing."""
    import copy

    cfg, paths, overrides = redraw_run
    agg = selection.run_redraws(cfg, n_draws=2, members=["protonet", "knn"], rules=["mean"], seed=3)
    own = io.read_json(paths.redraw_dir / "results.json")
    other = copy.deepcopy(cfg)
    other.run.name = f"{cfg.run.name}_b"
    b_file = selection.RunPaths(other).redraw_dir / "results.json"

    def write_b(edit):
        res = copy.deepcopy(own)
        res["aggregate"]["encoder_seeds"] = [cfg.run.seed + 5]
        res["aggregate"]["encoder_runs"] = [other.run.name]
        for d in res["draws"]:
            d["encoder_seed"] = cfg.run.seed + 5
            for kind in ("members", "rules"):
                for r in d[kind].values():
                    r["truth"] -= 0.1  # a worse encoder
        edit(res)
        io.write_json(b_file, res)

    write_b(lambda res: None)
    stamp = (paths.redraw_dir / "results.json").stat().st_mtime_ns
    code, err = run_script("redraw.py", *overrides, "--merge", other.run.name, capsys=capsys)
    assert code == 0, err
    merged = io.read_json(paths.redraw_merged_dir / "results.json")
    m = merged["aggregate"]
    assert m["n_draws"] == 4 and m["encoder_seeds"] == [cfg.run.seed, cfg.run.seed + 5]
    assert m["encoder_runs"] == [cfg.run.name, other.run.name] and m["draws_per_encoder"] == 2
    assert [d["encoder_seed"] for d in merged["draws"]] == [cfg.run.seed] * 2 + [cfg.run.seed + 5] * 2
    truths = [d["rules"]["mean"]["truth"] for d in own["draws"]]
    assert m["rules"]["mean"]["mean"] == pytest.approx(np.mean(truths) - 0.05)  # both encoders' draws
    assert m["rules"]["mean"]["worst"] == pytest.approx(min(truths) - 0.1)
    assert m["rules"]["mean"]["mean"] == pytest.approx(agg["rules"]["mean"]["mean"] - 0.05)
    assert m["estimators"]["blend"]["bias"] == pytest.approx(agg["estimators"]["blend"]["bias"] + 0.05)
    assert (paths.redraw_merged_dir / "table.md").read_text().count("| member ") == 2
    assert (paths.redraw_dir / "results.json").stat().st_mtime_ns == stamp  # the run's own table is kept

    def moved_support(res):
        res["draws"][1]["support"][0] += 1

    def other_members(res):
        res["aggregate"]["members_list"] = ["protonet"]

    def same_seed(res):
        res["aggregate"]["encoder_seeds"] = [cfg.run.seed]

    (paths.redraw_merged_dir / "results.json").unlink()
    for edit, args, message in ((moved_support, [], "draw 1's support differs"),
                                (other_members, [], "members_list is ['protonet']"),
                                (same_seed, [], f"encoder seed {cfg.run.seed} is in"),
                                (lambda res: None, ["--fresh"], "--fresh would compute them"),
                                (lambda res: None, ["--merge", "nope"], "run redraw.py on run 'nope' first")):
        write_b(edit)
        code, err = run_script("redraw.py", *overrides, "--merge", other.run.name, *args, capsys=capsys)
        assert code == 2 and message in err and err.strip().count("\n") == 0, err
        assert not (paths.redraw_merged_dir / "results.json").exists()


def test_relabel_loo_script_reads_the_redraw_cache(redraw_run, capsys):
    """scripts/relabel_loo.py: the group LOO it prints is the cached member's (redraw.py's cv), the
    relabel LOO is computed, and a member that reads no pseudo-labels exits 2 with one line."""
    import re
    import runpy
    import sys
    from pathlib import Path

    cfg, paths, overrides = redraw_run
    code, err = run_script("redraw.py", *overrides, "--pool", "test", "--draws", "1", "--members", "protonet,knn",
                           "--rules", "mean", capsys=capsys)
    assert code == 0, err
    cv = json.loads((paths.redraw_dir / "results.json").read_text())["draws"][0]["members"]

    def script(*args):
        argv = sys.argv
        sys.argv = ["relabel_loo.py", *overrides, *args]
        try:
            runpy.run_path(str(Path(selection.__file__).parents[1] / "scripts" / "relabel_loo.py"), run_name="__main__")
        except SystemExit as exc:
            return exc.code
        finally:
            sys.argv = argv

    capsys.readouterr()
    import src.stages.heads as stage_heads

    def no_stacker(*a, **k):
        raise AssertionError("the relabel folds built the stacker's rows")

    with pytest.MonkeyPatch.context() as mp:  # the folds need the heads' inputs, not the stacker's table
        mp.setattr(stage_heads, "stack_rows", no_stacker)
        assert script("--draws", "1", "--members", "protonet,knn") == 0
    out = first = capsys.readouterr().out
    for m in ("protonet", "knn"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"draw 0 {m}:"))
        assert f"LOO group {cv[m]['cv']:.3f}" in line and re.search(r"LOO relabel [01]\.\d{3}", line), line
        assert f"{m}: LOO - test over 1 draws" in out
    # --table: the redraw run's members and rules scored again, the relabel LOO in place for knn only
    assert script("--draws", "1", "--members", "knn", "--table") == 0
    out = capsys.readouterr().out
    again = json.loads((paths.redraw_dir / "relabel" / "results.json").read_text())["draws"][0]["members"]
    line = next(ln for ln in out.splitlines() if ln.startswith("draw 0 knn:"))
    assert f"LOO relabel {again['knn']['cv']:.3f}" in line and "| estimator |" in out
    assert again["protonet"]["cv"] == cv["protonet"]["cv"] and again["knn"]["truth"] == cv["knn"]["truth"]
    assert script("--draws", "1", "--members", "logreg") == 2
    err = capsys.readouterr().err.strip()
    assert "'logreg' reads no pseudo-labels" in err and err.count("\n") == 0
    # redraw.py with leave-one-out folds (pseudo.crossfit_folds=-1) scores the relabel LOO as its members' cv
    code, err = run_script("redraw.py", *overrides, "pseudo.crossfit_folds=-1", "--pool", "test", "--draws", "1",
                           "--members", "protonet,knn", "--rules", "mean", capsys=capsys)
    assert code == 0, err
    folded = json.loads((paths.redraw_dir / "results.json").read_text())["draws"][0]["members"]
    for m in ("protonet", "knn"):
        line = next(ln for ln in first.splitlines() if ln.startswith(f"draw 0 {m}:"))
        assert f"LOO relabel {folded[m]['cv']:.3f}" in line and folded[m]["truth"] == cv[m]["truth"], line


META = ["meta.methods=[protonet_episodic,siamese]", "meta.train_block=false", "meta.pool=clusters",
        "meta.clusters=12", "meta.episodes=3", "meta.meta_batch=1", "meta.n_way=3", "meta.n_query=2"]


def test_meta_members_on_the_runs_own_support_are_what_04_meta_writes(redraw_run, tmp_path, capsys):
    """A 04_meta method as a re-draw member (meta_<method>) runs 04_meta's code on the draw: drawn on
    the run's own support, it gives the probabilities and LOO that 04_meta wrote."""
    _, paths, overrides = redraw_run
    code, err = run_script("04_meta.py", *overrides, *META, capsys=capsys)
    assert code == 0, err[-2000:]
    from src.config import load_config
    from src.data import load_data
    from src.runtime import resolve_device

    cfg = load_config(None, [*overrides, *META])
    data = load_data(paths)
    emb = io.read_npy(paths.embeddings("ssl")).astype(np.float32)
    names = ["meta_protonet_episodic", "meta_siamese", "knn"]
    m, scored = selection.draw_members(cfg, data, emb, selection.known_labels(cfg, data), data.labeled_idx, names,
                                       resolve_device("cpu"), None, tmp_path / "cache")
    np.testing.assert_array_equal(scored, data.test_idx)
    assert m.sources == ["meta", "meta", "heads"] and m.transductive == [False, False, False]
    for k, method in enumerate(("protonet_episodic", "siamese")):
        np.testing.assert_allclose(m.probs[k], io.read_npy(paths.head_probs(method, "meta")), atol=1e-5)
        np.testing.assert_allclose(m.oof[k], io.read_npy(paths.head_oof(method, "meta")), atol=1e-5)
    assert {p.name for p in (tmp_path / "cache").iterdir()} >= {f"{n}.safetensors" for n in names}
    code, err = run_script("redraw.py", *overrides, "--members", "knn,meta_nope", capsys=capsys)
    assert code == 2 and "unknown member 'meta_nope'" in err and "meta_siamese" in err, err


def test_redraws_with_meta_members_count_the_family_once(redraw_run, capsys):
    _, paths, overrides = redraw_run
    members = "protonet,knn,meta_protonet_episodic,meta_siamese"
    for once in ("[meta]", "[]"):
        code, err = run_script("redraw.py", *overrides, *META, f"ensemble.count_once={once}", "--draws", "2",
                               "--members", members, "--rules", "mean", capsys=capsys)
        assert code == 0, err[-2000:]
        results = json.loads((paths.redraw_dir / "results.json").read_text())
        weights = [d["rules"]["mean"]["weights"] for d in results["draws"]]
        expected = [1 / 3, 1 / 3, 1 / 6, 1 / 6] if once == "[meta]" else [1 / 4] * 4
        np.testing.assert_allclose(weights, [expected] * 2)
        assert "04_meta's encoder (the SSL encoder, not 03_metric's)" in results["aggregate"]["not_redrawn"]
    # the members were computed once: the second run read them from the cache
    assert len(list((paths.redraw_dir / "cache").rglob("meta_siamese.safetensors"))) == 2


def test_the_saved_encoder_goes_to_04_meta_and_never_changes_a_head(redraw_run, monkeypatch):
    """With meta.train_block the re-draws load the SSL encoder for 04_meta's methods; the heads keep
    reading the embeddings (cosine_finetune fine-tunes an encoder it is handed)."""
    from types import SimpleNamespace

    import src.models.encoder as encoder_module
    import src.stages.heads as heads_stage
    import src.stages.meta as meta_stage

    cfg, paths, overrides = redraw_run
    from src.config import load_config

    cfg = load_config(None, [*overrides, *META, "meta.train_block=true"])
    saved, seen = object(), {"heads": [], "meta": []}
    monkeypatch.setattr(encoder_module, "load_encoder", lambda *a, **k: saved)
    real_head_outputs = heads_stage.head_outputs

    def head_spy(name, cfg_, h, table, encoder=None, *args, **kwargs):
        seen["heads"].append(encoder)
        return real_head_outputs(name, cfg_, h, table, None, *args, **kwargs)

    def assemble_spy(cfg_, data, source, pool, device, encoder, emb, truth=None, verbose=True, trunk=None):
        seen["meta"].append((source, encoder))
        assert trunk.encoder is saved  # the draws' shared trunk features are the same encoder's
        return SimpleNamespace(device=device)

    n_test, n_lab = len(selection.load_data(paths).test_idx), 30
    fake = np.full((n_test, 10), 0.1, np.float32), np.full((n_lab, 10), 0.1, np.float32)
    monkeypatch.setattr(heads_stage, "head_outputs", head_spy)
    monkeypatch.setattr(meta_stage, "assemble_inputs", assemble_spy)
    monkeypatch.setattr(meta_stage, "run_method", lambda name, inp: ({}, *fake))
    selection.run_redraws(cfg, n_draws=1, members=["knn", "cosine_finetune", "meta_siamese"], rules=["mean"])
    assert seen["heads"] == [None, None] and seen["meta"] == [("ssl", saved)]


def test_redraws_compute_the_label_free_inputs_once(redraw_run, monkeypatch):
    """02_pseudo's labeler graph and 04_meta's trunk features read no label: the draws share them,
    so each image's trunk features are computed once over all draws."""
    import src.meta.base as meta_base
    import src.stages.pseudo as pseudo_stage
    from src.config import BackboneCfg, load_config
    from src.models.encoder import Encoder, save_encoder

    _, paths, overrides = redraw_run
    cfg = load_config(None, [*overrides, *META, "meta.train_block=true"])
    torch.manual_seed(0)
    size = selection.load_data(paths).images.shape[1]
    save_encoder(Encoder(BackboneCfg(name="resnet18", width=4), size), paths.encoder("ssl"), paths.encoder_spec("ssl"))
    computed, graphs = [], []
    real_trunk, real_input = meta_base.trunk_features, pseudo_stage.labeler_input

    def trunk_spy(encoder, images, rows, *args, **kwargs):
        computed.extend(np.asarray(rows).tolist())
        return real_trunk(encoder, images, rows, *args, **kwargs)

    def input_spy(*args, **kwargs):
        graphs.append(1)
        return real_input(*args, **kwargs)

    monkeypatch.setattr(meta_base, "trunk_features", trunk_spy)
    monkeypatch.setattr(pseudo_stage, "labeler_input", input_spy)
    out = selection.run_redraws(cfg, n_draws=2, members=["knn", "meta_protonet_episodic"], rules=["mean"],
                                fresh=True)
    assert out["n_draws"] == 2 and len(graphs) == 1
    assert computed and len(computed) == len(set(computed))  # no image's trunk features twice
