"""Stages 05/06 on a fake run (digits, PCA embeddings standing in for 01_ssl, optional fake
pseudo-labels): the head contract files, the submission + sidecar, the HTML report, the CV table
script, and nothing half-written on bad input."""
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from conftest import run_script
from src import io
from src.config import load_config
from src.data import load_data
from src.ensemble import greedy_weights
from src.errors import UserError
from src.heads import l2_normalize
from src.paths import RunPaths
from src.report import render_report
from src.stages import get_stage, run_stage

SMALL = ["heads.finetune_steps=5", "cv.redraws=4", "cv.episodes=4", "cv.n_query=3", "cv.episode_min_confidence=0",
         "ensemble.stacker_rounds=10",
         "ensemble.report_tsne_points=300", "cv.stack_max_pseudo=200", "run.progress=false", "run.device=cpu"]


def make_run(comp, tmp_path, pseudo=True, extra=(), truth=None, name="t"):
    """Prepared digits run with fake 01_ssl embeddings (and fake 02_pseudo labels). truth: the truth
    file (default: truth.csv beside the competition folder)."""
    truth = comp.parent / "truth.csv" if truth is None else truth
    overrides = [f"data.path={comp}", f"data.truth={truth}", f"run.root={tmp_path / 'runs'}",
                 f"run.submissions_dir={tmp_path / 'subs'}", f"run.name={name}", *SMALL, *extra]
    cfg = load_config(None, overrides)
    paths = RunPaths(cfg)
    run_stage(get_stage("prepare"), cfg)
    data = load_data(paths)
    pixels = np.asarray(data.images, np.float32).reshape(len(data.images), -1)
    z = l2_normalize(PCA(16, random_state=0).fit_transform(pixels))
    io.write_npy(paths.embeddings("ssl"), z.astype(np.float16))
    io.write_json(paths.done_marker("ssl"), {"fingerprint": "fake-ssl", "summary": {}})
    for step in range(5):
        io.append_jsonl(paths.log("ssl"), {"epoch": step, "loss": 1.0 / (step + 1), "knn_acc": 0.1 * step})
    if pseudo:
        un = data.unlabeled_idx
        lab = data.labeled_idx
        protos = l2_normalize(np.stack([z[lab][data.class_ids[lab] == c].mean(0) for c in range(data.n_classes)]))
        sims = z[un] @ protos.T
        frame = pd.DataFrame({"image_id": data.index["image_id"].to_numpy()[un], "label": data.classes[sims.argmax(1)],
                              "confidence": (sims.max(1) + 1) / 2, "source": "fake", "selected": True})
        io.write_csv(paths.pseudo_labels(), frame)
        io.write_json(paths.done_marker("pseudo"), {"fingerprint": "fake-pseudo", "summary": {}})
    return cfg, paths, overrides


@pytest.fixture
def truth_comp(comp, digits_folder):
    """The mutable digits copy plus the truth file conftest wrote beside the session folder."""
    src = digits_folder.parent / "truth.csv"
    (comp.parent / "truth.csv").write_bytes(src.read_bytes())
    return comp


def img_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_heads_submit_report_end_to_end(truth_comp, tmp_path, capsys):
    cfg, paths, overrides = make_run(truth_comp, tmp_path)
    data = load_data(paths)
    code, err = run_script("05_heads.py", *overrides, capsys=capsys)
    assert code == 0, err
    n_test, n_lab, c = len(data.test_idx), len(data.labeled_idx), data.n_classes
    for head in cfg.heads.heads:
        probs, oof = io.read_npy(paths.head_probs(head)), io.read_npy(paths.head_oof(head))
        assert probs.shape == (n_test, c) and oof.shape == (n_lab, c) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    cv = io.read_json(paths.cv_report)
    assert set(cv["heads"]) == set(cfg.heads.heads) and cv["n_pseudo_support"] > 0
    for rec in cv["heads"].values():
        lo, hi = rec["loo"]["interval"]
        assert rec["loo"]["n"] == n_lab and lo <= rec["loo"]["accuracy"] <= hi
        assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["episodic"]["episodes"] == 4
        assert {"1-shot", "2-shot"} <= set(rec["redraws"])
    code, err = run_script("06_submit.py", *overrides, "ensemble.method=weighted", capsys=capsys)
    assert code == 0, err
    sub_path = paths.submission("ensemble")
    sub = pd.read_csv(sub_path, dtype={"image_id": str})
    sample = pd.read_csv(truth_comp / "sample_submission.csv", dtype={"image_id": str})
    assert sub["image_id"].tolist() == sample["image_id"].tolist() and sub["label"].isin(data.classes).all()
    sidecar = io.read_json(sub_path.with_suffix(".json"))
    assert sidecar["method"] == "weighted" and sidecar["members"] == cfg.heads.heads
    # the weights are the greedy selection on the heads' LOO probabilities (local CV), nothing else
    oofs = [io.read_npy(paths.head_oof(h)) for h in sidecar["members"]]
    want = greedy_weights(oofs, data.class_ids[data.labeled_idx], cfg.ensemble.weight_rounds)
    assert [sidecar["weights"][h] for h in sidecar["members"]] == pytest.approx(want.tolist())
    assert "ensemble:stack" in sidecar["local_cv"] and paths.submission(sidecar["best_single"]).exists()
    # report: every <img> exists and is a non-empty PNG
    html = (paths.report_dir / "index.html").read_text()
    srcs = img_sources(html)
    assert {"cv.png", "tsne.png", "confusion.png", "curves_ssl.png"} <= set(srcs)
    for s in srcs:
        png = (paths.report_dir / s).read_bytes()
        assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Duplicate images" in html
    # the CV table script: every head and ensemble, with the truth accuracy beside it
    result = run_script("cv.py", *overrides, capsys=capsys)
    assert result[0] == 0, result[1]
    for name in [*cfg.heads.heads, "ensemble:weighted", "ensemble:stack"]:
        line = next(row for row in result.out.splitlines() if row.startswith(name + " "))
        acc = io.read_json(paths.cv_report)["heads"][name]["test_accuracy"] if name in cv["heads"] else \
            io.read_json(paths.stage("submit") / "ensemble.json")["rows"][name]["test_accuracy"]
        assert line.rstrip().endswith(f"{acc:.4f}")


def test_final_line_prints_truth_accuracy(truth_comp, tmp_path, capsys):
    cfg, paths, overrides = make_run(truth_comp, tmp_path, pseudo=False,
                                     extra=["heads.heads=[protonet,knn]", "ensemble.report=false", "ensemble.method=auto"])
    run_stage(get_stage("heads"), cfg)
    capsys.readouterr()
    run_stage(get_stage("submit"), cfg)
    out = capsys.readouterr().out.strip().splitlines()
    final = [line for line in out if "test accuracy" in line][-1]
    summary = io.read_json(paths.done_marker("submit"))["summary"]
    assert final.startswith(f"t test accuracy {summary['test_accuracy']:.4f} (truth file ")
    # method auto: the candidate rule with the best local CV (then lower log-loss), never chosen on truth
    rows = io.read_json(paths.stage("submit") / "ensemble.json")["rows"]
    cands = [c for c in cfg.ensemble.auto_candidates if f"ensemble:{c}" in rows]
    best = min(cands, key=lambda k: (-rows[f"ensemble:{k}"]["accuracy"], rows[f"ensemble:{k}"]["log_loss"], cands.index(k)))
    assert summary["method"] == "auto" and "(ensemble:auto)" in final
    assert rows["ensemble:auto"]["test_accuracy"] == rows[f"ensemble:{best}"]["test_accuracy"]
    assert f": {best} (" in io.read_json(paths.stage("submit") / "ensemble.json")["note"]
    # truth only scores: scrambled truth labels change the printed accuracy, not the submission
    before = paths.submission("ensemble").read_text(), io.read_json(paths.submission("ensemble").with_suffix(".json"))
    truth_file = truth_comp.parent / "truth.csv"
    truth = pd.read_csv(truth_file, dtype={"image_id": str})
    truth["label"] = np.roll(truth["label"].to_numpy(), 1)
    truth.to_csv(truth_file, index=False)
    run_stage(get_stage("submit"), cfg, force=True)
    after = paths.submission("ensemble").read_text(), io.read_json(paths.submission("ensemble").with_suffix(".json"))
    assert after[0] == before[0] and after[1]["method"] == before[1]["method"]
    assert after[1]["local_cv"] == before[1]["local_cv"]
    # without pseudo-labels: no stacker rows beyond the labeled ones, episodes skipped
    cv = io.read_json(paths.cv_report)
    assert "skipped" in cv["heads"]["knn"]["episodic"] and cv["n_pseudo_support"] == 0


def test_submit_bad_member_leaves_nothing_written(truth_comp, tmp_path, capsys):
    cfg, paths, overrides = make_run(truth_comp, tmp_path, pseudo=False,
                                     extra=["heads.heads=[protonet,logreg]", "ensemble.report=false"])
    run_stage(get_stage("heads"), cfg)
    bad = io.read_npy(paths.head_probs("logreg"))[:-1]  # one test row short
    io.write_npy(paths.head_probs("logreg"), bad)
    code, err = run_script("06_submit.py", *overrides, capsys=capsys)
    assert code == 2 and "logreg/probs_test.npy: shape" in err
    assert not paths.submission("ensemble").exists() and not paths.submission("ensemble").with_suffix(".json").exists()
    assert not paths.submission("protonet").exists() and not paths.done_marker("submit").exists()
    with pytest.raises(UserError, match="ensemble.members: 'nope' has no outputs"):
        run_stage(get_stage("submit"), load_config(None, overrides + ["ensemble.members=[nope]"]))
    # bad rule names: one line naming the key, exit 2, checked before any member is read
    for arg, key in (("ensemble.method=nope", "ensemble.method: unknown rule 'nope'"),
                     ("ensemble.auto_candidates=[mean,nope]", "ensemble.auto_candidates: unknown rule 'nope'"),
                     ("ensemble.auto_candidates=[auto]", "ensemble.auto_candidates: 'auto' cannot be"),
                     ("ensemble.gate_agreement=1.5", "ensemble.gate_agreement: must be in [0, 1]"),
                     ("ensemble.count_once=[metas]", "ensemble.count_once: expected stages among heads, meta, "
                                                     "got 'metas'")):
        code, err = run_script("06_submit.py", *overrides, arg, capsys=capsys)
        assert code == 2 and err.strip().count("\n") == 0 and key in err, err


def test_heads_stage_user_errors(truth_comp, tmp_path, capsys):
    cfg, paths, overrides = make_run(truth_comp, tmp_path, pseudo=False)
    code, err = run_script("05_heads.py", *overrides, "heads.heads=[protonet,nope]", capsys=capsys)
    assert code == 2 and "unknown head 'nope'" in err and not paths.cv_report.exists()
    code, err = run_script("05_heads.py", *overrides, "heads.embeddings=metric", capsys=capsys)
    assert code == 2 and "heads.embeddings=metric" in err


def test_report_renders_from_synthetic_inputs(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    paths = RunPaths(cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    io.append_jsonl(paths.log("metric"), {"step": 1, "loss": 2.0})
    io.append_jsonl(paths.log("metric"), {"step": 2, "loss": 1.5, "lr": 0.1})
    for method in ("a", "b"):  # grouped curves (one line per method) and a summary line without a step
        for it in (10, 20):
            io.append_jsonl(paths.log("meta"), {"method": method, "iteration": it, "loss": 1.0 / it,
                                                "parts": {"ce": 0.5 / it}})
        io.append_jsonl(paths.log("meta"), {"method": method, "loo_accuracy": 0.5})
    io.append_jsonl(paths.log("pseudo"), {"note": "no step key"})  # nothing to plot: no panel
    rows = {"protonet": {"accuracy": 0.8, "interval": [0.6, 0.9], "test_accuracy": 0.75},
            "ensemble:mean": {"accuracy": 0.85, "interval": [0.7, 0.95], "test_accuracy": None}}
    html_path = render_report(paths, "t", rows, [0, 1, 2], x, np.arange(120), [("truth", y)],
                              np.arange(120) < 10, (y, (y + (rng.random(120) < 0.2)) % 3, "c"), ["line"])
    html = html_path.read_text()
    assert img_sources(html) == ["cv.png", "tsne.png", "confusion.png", "curves_metric.png", "curves_meta.png"]
    for s in img_sources(html):
        assert (paths.report_dir / s).stat().st_size > 1000
    assert "No data report" in html  # no 00_prepare in this run: said, not crashed


def test_pseudo_groups_follow_their_labeled_image_out_of_the_support(monkeypatch):
    """inherited_from: the nearest labeled image of the row's own pseudo-class; and a LOO fit never
    sees the held-out image nor the pseudo-labels inherited from it (spy head)."""
    import src.stages.heads as stage

    x = np.eye(10, dtype=np.float32)  # row r's embedding is the unit vector e_r: support rows are readable
    x[6] = l2_normalize(x[6:7] + 0.3 * x[0:1])[0]  # pseudo row 6, pseudo-class 0: nearest labeled image 0
    # pseudo row 7, pseudo-class 1: labeled image 0 (class 0) is nearer, but it inherits from 3 (class 1)
    x[7] = l2_normalize(x[7:8] + 0.6 * x[0:1] + 0.3 * x[3:4])[0]
    labeled, labeled_y = np.arange(4), np.array([0, 0, 1, 1])
    pseudo, pseudo_y = np.array([6, 7]), np.array([0, 1])
    groups = stage.inherited_from(x, pseudo, pseudo_y, labeled, labeled_y)
    assert groups.tolist() == [0, 3]

    seen = []

    class Spy:
        transductive, runs_encoder = False, False

        def fit(self, sx, sy, n_classes, query_x=None, support_weight=None):
            seen.append(sorted(int(np.argmax(r)) for r in sx))
            return self

        def predict_proba(self, q):
            return np.full((len(q), 2), 0.5, np.float32)

    monkeypatch.setattr(stage, "make_head", lambda *a, **k: Spy())
    h = stage.HeadInputs(x=x, images=None, n_classes=2, labeled=labeled, labeled_y=labeled_y, test=np.array([8, 9]),
                         pseudo=pseudo, pseudo_y=pseudo_y, pseudo_w=np.full(2, 0.9, np.float32), pseudo_group=groups)
    fp = stage.fit_predict_fn("spy", load_config(None), h, None, "cpu", True, labeled, labeled_y,
                              np.ones(4, np.float32), np.arange(4), h.test)
    from src.cv import leave_one_out
    leave_one_out(fp, labeled_y)
    assert seen == [[1, 2, 3, 7], [0, 2, 3, 6, 7], [0, 1, 3, 6, 7], [0, 1, 2, 6]]


def test_submit_counts_the_meta_family_once(truth_comp, tmp_path, capsys):
    """06_submit: 04_meta's methods enter as meta_<method> and, with ensemble.count_once=[meta] (the
    default), share one member's weight in the rule; with [] each weighs as a head."""
    cfg, paths, overrides = make_run(truth_comp, tmp_path, pseudo=False,
                                     extra=["heads.heads=[protonet,knn]", "ensemble.report=false"])
    run_stage(get_stage("heads"), cfg)
    data = load_data(paths)
    rng = np.random.default_rng(0)
    for method in ("maml", "reptile", "siamese"):
        for path, rows in ((paths.head_probs(method, "meta"), len(data.test_idx)),
                           (paths.head_oof(method, "meta"), len(data.labeled_idx))):
            p = rng.random((rows, data.n_classes)).astype(np.float32)
            io.write_npy(path, p / p.sum(1, keepdims=True))
    io.write_json(paths.done_marker("meta"), {"fingerprint": "fake-meta", "summary": {}})
    members = ["protonet", "knn", "meta_maml", "meta_reptile", "meta_siamese"]
    for once, weights in (("[meta]", [1 / 3, 1 / 3, 1 / 9, 1 / 9, 1 / 9]), ("[]", [1 / 5] * 5)):
        code, err = run_script("06_submit.py", *overrides, "ensemble.method=mean", f"ensemble.count_once={once}",
                               "--force", capsys=capsys)
        assert code == 0, err
        sidecar = io.read_json(paths.submission("ensemble").with_suffix(".json"))
        assert sidecar["members"] == members
        assert [sidecar["weights"][m] for m in members] == pytest.approx(weights)
        assert ("counted once: meta" in sidecar["note"]) == (once == "[meta]")
