"""Pseudo-labeling: neighbours, labelers on Gaussian blobs (known answers), Hungarian mapping,
selection rules, config errors, and the 02_pseudo stage end to end (with resume) on tiny digits."""
import numpy as np
import pandas as pd
import pytest
import torch

from src import io
from src.config import BackboneCfg, Config, PseudoCfg, load_config
from src.errors import UserError
from src.neighbors import affinity_matrix, kmeans, knn_graph, knn_search, normalized_adjacency
from src.pseudo.labelers import LABELERS, LabelingContext, check_classes, map_clusters_to_classes
from src.pseudo.report import precision_at_coverage
from src.pseudo.selection import (SelfAdaptiveThreshold, combine, distribution_alignment, freematch_thresholds,
                                  pseudo_label, select_freematch, select_threshold, select_topk)
from src.transductive import center_normalize

CPU = torch.device("cpu")



def blobs(n_per=40, n_classes=10, dim=16, sigma=0.15, n_labeled=3, seed=0):
    """Unit-norm Gaussian blobs around random unit centres: (x (N, D), y (N,), labeled rows)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_classes), n_per)
    x = centers[y] + sigma * rng.normal(size=(len(y), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    labeled = np.concatenate([np.flatnonzero(y == c)[:n_labeled] for c in range(n_classes)])
    return x, y, labeled


# ---------------------------------------------------------------------------------------------
# neighbours
# ---------------------------------------------------------------------------------------------
def test_knn_graph_matches_brute_force_and_excludes_self():
    x, _, _ = blobs(n_per=10)
    sims, idx = knn_graph(x, 5, CPU)
    ref = x @ x.T
    np.fill_diagonal(ref, -np.inf)
    ref_idx = np.argsort(-ref, axis=1)[:, :5]
    assert idx.shape == (len(x), 5) and not (idx == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ref_idx, 1), atol=1e-5)
    s2, _ = knn_search(x[:3], x, 1, CPU)
    np.testing.assert_allclose(s2[:, 0], 1.0, atol=1e-5)  # a row's nearest row is itself


def test_kmeans_recovers_blobs_and_assigns_to_nearest_centroid():
    x, y, _ = blobs(n_per=30)
    centroids, assign = kmeans(x, 10, iters=20, seed=0, device=CPU)
    np.testing.assert_array_equal(assign, (x @ centroids.T).argmax(1))
    purity = sum(np.bincount(y[assign == k]).max() for k in np.unique(assign)) / len(y)
    assert purity >= 0.95


def test_affinity_is_symmetric_and_normalised():
    x, _, _ = blobs(n_per=5)
    w = affinity_matrix(*knn_graph(x, 4, CPU), gamma=3.0)
    assert abs(w - w.T).max() < 1e-12
    s = normalized_adjacency(w).toarray()
    d = np.asarray(w.sum(1)).ravel()
    np.testing.assert_allclose(s, w.toarray() / np.sqrt(np.outer(d, d)), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# labelers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["propagation", "kmeans", "scan", "prototype", "knn"])
def test_labeler_on_separated_blobs(name):
    """10 well-separated blobs, 3 labels each: every labeler reaches >= 95% on all images."""
    x, y, lab = blobs()
    cfg = PseudoCfg(kmeans_clusters=20, knn_k=10)
    probs = LABELERS.get(name)(LabelingContext(x, lab, y[lab], 10, cfg, CPU))
    assert probs.shape == (len(x), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (probs.argmax(1) == y).mean() >= 0.95, name


def test_propagation_matches_closed_form():
    """CG solution == dense (I - alpha S)^-1 Y of Zhou et al., then class-mass + row normalisation."""
    x, y, lab = blobs(n_per=6, sigma=0.3)
    cfg = PseudoCfg(knn_k=5, propagation_alpha=0.9, propagation_iters=200)
    ctx = LabelingContext(x, lab, y[lab], 10, cfg, CPU)
    s = normalized_adjacency(affinity_matrix(*ctx.graph(), gamma=cfg.propagation_gamma)).toarray()
    yy = np.zeros((len(x), 10))
    yy[lab, y[lab]] = 1
    f = np.clip(np.linalg.solve(np.eye(len(x)) - 0.9 * s, yy), 0, None)
    f /= f.sum(0, keepdims=True)
    f /= f.sum(1, keepdims=True)
    np.testing.assert_allclose(LABELERS.get("propagation")(ctx), f, atol=1e-4)


def test_propagation_beats_chance_on_overlapping_blobs():
    x, y, lab = blobs(sigma=0.3, n_per=60)
    probs = LABELERS.get("propagation")(LabelingContext(x, lab, y[lab], 10, PseudoCfg(), CPU))
    assert (probs.argmax(1) == y).mean() >= 0.8


def test_knn_support_grows_with_previous_selection():
    """Extra (pseudo-labeled) support rows vote; a row never votes for itself."""
    x, y, lab = blobs(n_per=10)
    extra = np.setdiff1d(np.arange(len(x)), lab)[:20]
    ctx = LabelingContext(x, lab, y[lab], 10, PseudoCfg(knn_k=3), CPU, extra_idx=extra, extra_y=(y[extra] + 1) % 10)
    probs = LABELERS.get("knn")(ctx)
    assert (probs[extra].argmax(1) != (y[extra] + 1) % 10).mean() > 0.5  # wrong own label not echoed


def test_center_normalize_removes_the_common_direction():
    """Blobs shifted by a shared offset (like post-ReLU features, mean cosine ~0.95): k-means
    labels fail on the raw rows and work again after CL2N."""
    x, y, lab = blobs(sigma=0.1)
    shifted = x + 1.0
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    z = center_normalize(shifted)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert (z @ z.mean(0)).mean() < 0.05 and (shifted @ shifted.mean(0)).mean() > 0.9
    acc = {}
    for name, emb in (("raw", shifted), ("cl2n", z)):
        probs = LABELERS.get("kmeans")(LabelingContext(emb, lab, y[lab], 10, PseudoCfg(kmeans_clusters=20), CPU))
        acc[name] = (probs.argmax(1) == y).mean()
    assert acc["raw"] <= 0.5 and acc["cl2n"] >= 0.85, acc


def test_hungarian_mapping_is_one_to_one():
    perm = np.array([3, 7, 0, 9, 1, 2, 8, 4, 6, 5])  # class c lives in cluster perm[c]
    y = np.repeat(np.arange(10), 3)
    clusters = perm[y].copy()
    clusters[0] = perm[1]  # one labeled image of class 0 strays into class 1's cluster
    q = map_clusters_to_classes(clusters, y, 10, 10)
    assert (q.sum(0) == 1).all() and (q.sum(1) == 1).all()
    np.testing.assert_array_equal(q.argmax(1)[perm], np.arange(10))


def test_hungarian_resolves_conflict_majority_cannot():
    """Cluster 0 holds 2 of class 0 and 1 of class 1; cluster 1 holds 1 of class 0. Majority would map
    both clusters to class 0; the one-to-one assignment maps cluster 1 to class 1."""
    q = map_clusters_to_classes(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 0]), 2, 2)
    np.testing.assert_array_equal(q.argmax(1), [0, 1])


def test_overclustering_majority_and_prior_for_empty_clusters():
    prior = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.9]])  # cluster 2 has no labeled image
    q = map_clusters_to_classes(np.array([0, 1]), np.array([0, 1]), 3, 2, prior=prior)
    np.testing.assert_array_equal(q.argmax(1), [0, 1, 1])


def test_class_without_labeled_image_is_a_user_error():
    with pytest.raises(UserError, match="class 3 has no labeled image"):
        check_classes(np.array([0, 1, 2, 4]), 5)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def test_threshold_is_inclusive_and_exact():
    conf = np.array([0.5, 0.9, 0.8999, 0.95])
    np.testing.assert_array_equal(select_threshold(conf, 0.9), [False, True, False, True])


def test_topk_is_class_balanced_and_keeps_the_most_confident():
    rng = np.random.default_rng(0)
    label = np.repeat([0, 1, 2], [50, 20, 5])
    conf = rng.random(len(label))
    mask = select_topk(label, conf, 3, k=10)
    np.testing.assert_array_equal(np.bincount(label[mask], minlength=3), [10, 10, 5])
    for c in (0, 1):
        kept = conf[mask & (label == c)]
        assert kept.min() >= conf[~mask & (label == c)].max()


def test_freematch_thresholds_scale_with_class_marginal():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    tau = freematch_thresholds(probs.max(1).mean(), probs.mean(0))  # mean max 0.75; marginal (0.7, 0.3)
    np.testing.assert_allclose(tau, [0.75, 0.75 * 0.3 / 0.7])
    # class 1 (rarer) gets the lower threshold: its 0.6 row is selected although below 0.75
    np.testing.assert_array_equal(select_freematch(probs), [True, True, False, True])
    sat = SelfAdaptiveThreshold(2, CPU, momentum=0.5)
    sat.update(torch.tensor(probs, dtype=torch.float32))
    np.testing.assert_allclose(sat.tau.item(), 0.5 * 0.5 + 0.5 * 0.75)
    np.testing.assert_allclose(sat.thresholds().numpy(), [0.625, 0.625 * 0.4 / 0.6], rtol=1e-6)


def test_distribution_alignment_rows_sum_to_one_and_marginal_moves_to_uniform():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) + np.array([2.0, 0.5, 0.0, -1.0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = distribution_alignment(probs)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    kl = lambda m: float((m * np.log(m * 4)).sum())  # noqa: E731  KL(marginal || uniform)
    assert kl(out.mean(0)) < 0.5 * kl(probs.mean(0))


def test_agreement_filter_and_first_combine():
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], np.float32)
    b = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9]], np.float32)
    probs, agree, source = combine({"a": a, "b": b}, "first")
    np.testing.assert_array_equal(probs, a)
    np.testing.assert_array_equal(agree, [2, 1, 2])
    assert source == ["a+b", "a", "a+b"]
    cfg = PseudoCfg(selection="threshold", threshold=0.0, require_agreement=2, distribution_alignment=False)
    np.testing.assert_array_equal(pseudo_label({"a": a, "b": b}, cfg).selected, [True, False, True])
    _, agree3, _ = combine({"a": a, "b": b, "c": b}, "vote")  # b and c outvote a on row 1
    np.testing.assert_array_equal(agree3, [3, 2, 3])


def test_precision_at_coverage():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, True])
    table = precision_at_coverage(conf, correct, (0.25, 0.5, 1.0))
    np.testing.assert_allclose(table["precision"], [1.0, 0.5, 0.75])


# ---------------------------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------------------------
def test_cli_reports_a_bad_labeler_on_one_line_with_exit_2(capsys, tmp_path):
    from conftest import run_script

    code, err = run_script("02_pseudo.py", f"run.root={tmp_path}", "pseudo.labelers=[propagation, nope]",
                           capsys=capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "pseudo.labelers: unknown labeler 'nope'" in err


def test_config_errors_name_the_key():
    from src.stages.pseudo import validate

    with pytest.raises(UserError, match="pseudo.threshold"):
        load_config(None, ["pseudo.threshold=1.5"])
    for override, key in (("pseudo.labelers=[propagation, nope]", "pseudo.labelers"),
                          ("pseudo.selection=best", "pseudo.selection"),
                          ("pseudo.combine=max", "pseudo.combine"),
                          ("pseudo.knn_k=0", "pseudo.knn_k")):
        with pytest.raises(UserError, match=key):
            validate(load_config(None, [override]))


# ---------------------------------------------------------------------------------------------
# the stage, end to end on a tiny digits competition
# ---------------------------------------------------------------------------------------------
def _tiny_cfg(tmp_path, comp, truth) -> Config:
    return load_config(None, [
        f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu", "run.progress=false",
        f"data.path={comp}", f"data.truth={truth}", "pseudo.rounds=1", "pseudo.self_train_epochs=1",
        "pseudo.max_steps_per_epoch=2",
        "pseudo.self_train_batch_size=8", "pseudo.unlabeled_ratio=2", "pseudo.kmeans_clusters=20"])


def fake_ssl(cfg: Config) -> None:
    """A random tiny encoder and its embeddings stand in for 01_ssl (fast)."""
    from src.data.dataset import load_data
    from src.models.encoder import Encoder, embed, save_encoder
    from src.paths import RunPaths

    paths = RunPaths(cfg)
    torch.manual_seed(0)
    enc = Encoder(BackboneCfg(name="resnet18", width=4), 32)
    save_encoder(enc, paths.encoder("ssl"), paths.encoder_spec("ssl"))
    io.write_npy(paths.embeddings("ssl"), embed(enc, load_data(paths).images, CPU, 512).astype(np.float16))
    io.write_json(paths.done_marker("ssl"), {"fingerprint": "fake", "summary": {}})


def test_pseudo_stage_end_to_end_with_resume(comp, digits_folder, tmp_path, monkeypatch):
    from src.data.dataset import load_data
    from src.paths import RunPaths
    from src.stages import get_stage, run_stage
    import src.stages.pseudo as stage_mod

    cfg = _tiny_cfg(tmp_path, comp, digits_folder.parent / "truth.csv")
    run_stage(get_stage("prepare"), cfg)
    fake_ssl(cfg)
    paths = RunPaths(cfg)

    calls = []
    real = stage_mod.label_round

    def interrupted(cfg_, data, emb, device, extra_idx, extra_y, truth):
        calls.append(len(extra_idx))
        if len(calls) == 2:  # round 1, after its self-training: simulate Ctrl-C
            raise KeyboardInterrupt
        return real(cfg_, data, emb, device, extra_idx, extra_y, truth)

    monkeypatch.setattr(stage_mod, "label_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage(get_stage("pseudo"), cfg)
    assert (paths.pseudo_round(0) / "_done.json").exists() and not (paths.pseudo_round(1) / "_done.json").exists()
    assert (paths.pseudo_round(1) / "ckpt" / "latest.json").exists()  # self-training checkpoint kept
    summary = run_stage(get_stage("pseudo"), cfg)  # resumes: round 0 is not labeled again
    assert len(calls) == 3 and calls[2] > 0  # round 1 used round 0's selection as extra support

    data = load_data(paths)
    table = pd.read_csv(paths.pseudo_labels(), dtype={"image_id": str})
    assert list(table.columns) == ["image_id", "label", "confidence", "source", "selected"]
    assert len(table) == len(data.unlabeled_idx) and set(table["label"]) <= set(data.classes.tolist())
    assert table["confidence"].between(0, 1).all() and table["selected"].any()
    assert set(table["image_id"]) >= set(data.test_ids)
    emb = io.read_npy(paths.embeddings("pseudo"))
    assert emb.shape[0] == len(data.images) and emb.dtype == np.float16
    assert paths.encoder("pseudo").exists() and (paths.pseudo_round(1) / "encoder.safetensors").exists()
    assert not (paths.pseudo_round(1) / "ckpt").exists()
    assert set(summary["rounds"]) == {"0", "1"} and "prec@0.8" in summary["rounds"]["0"]
    assert (paths.stage("pseudo") / "summary.csv").exists() and paths.plot("pseudo", "precision_coverage").exists()


# ---------------------------------------------------------------------------------------------
# self-training fitted to a time budget
# ---------------------------------------------------------------------------------------------
def test_fit_total_steps_known_answers():
    from src.pseudo.selftrain import fit_total_steps

    # 25 steps took 3 s; 1 s left at 0.05 s per step: floor(0.95 / 0.05) = 19 more
    assert fit_total_steps(4.0, 3.0, 0.05, 25, 60) == 44
    assert fit_total_steps(100.0, 3.0, 0.05, 25, 60) == 60  # never longer than configured
    assert fit_total_steps(2.0, 3.0, 0.05, 25, 60) == 26  # over budget already: one more step ends it


def test_self_train_fits_its_budget_and_resumes_fitted(tmp_path, monkeypatch):
    """A fake clock (1 s per reading) makes the fit exact: t_round 0, epoch start 1, FIT_FROM 2,
    FIT_AT 3 -> 0.05 s per step, 3 s spent, budget 4 s -> 25 + 19 = 44 of the 2 x 30 steps."""
    import itertools
    import types

    import src.pseudo.selftrain as st
    from src.models.encoder import Encoder

    cfg = load_config(None, ["run.device=cpu", "run.progress=false", "pseudo.self_train_epochs=2",
                             "pseudo.self_train_batch_size=2", "pseudo.unlabeled_ratio=2",
                             "pseudo.self_train_budget_s=4", "pseudo.self_train_warmup_epochs=0.5"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(140, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    enc = Encoder(BackboneCfg(name="resnet18", width=4), 32)
    model = st.Classifier(enc, st.make_head("cosine", enc.dim, 10, 0.05, None))
    clock = itertools.count()
    monkeypatch.setattr(st, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    log_path = tmp_path / "train.jsonl"
    _, log = st.self_train(cfg, model, images, np.arange(20), np.arange(20) % 10, np.arange(20, 140), CPU,
                           tmp_path / "ckpt", log_path)
    assert [r["steps"] for r in log] == [30, 14] and {r["total_steps"] for r in log} == {44}
    assert log[-1]["lr"] < log[0]["lr"]  # the cosine was recomputed to end at the fitted total
    # Resume after the round: the fitted length comes from the checkpoint, nothing more is trained.
    _, again = st.self_train(cfg, model, images, np.arange(20), np.arange(20) % 10, np.arange(20, 140), CPU,
                             tmp_path / "ckpt", log_path)
    assert [r["steps"] for r in again] == [30, 14]
