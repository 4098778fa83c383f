"""Cross-fitted local CV (pseudo.crossfit_folds): each labeled image is predicted from the fold that
never saw its label, a fold hides exactly its labels, bad fold counts stop with one line, and a
fold's paths move only 02_pseudo's outputs. The digits run through 02_pseudo and 05_heads with folds is in
tests/test_tail_selftrain.py."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import run_script
from src.config import Config
from src.cv import leave_one_out
from src.data.dataset import CompetitionData
from src.errors import UserError
from src.paths import RunPaths
from src.stages import heads as heads_stage
from src.stages import pseudo as pseudo_stage


def test_each_labeled_row_is_predicted_by_its_own_fold_without_itself(monkeypatch):
    labeled_y = np.array([0, 1, 0, 1, 0, 1])
    fold = np.array([0, 0, 1, 1, 2, 2])
    calls = []

    def spy_fit_predict_fn(name, cfg, h, encoder, device, use_pseudo, rows, ys, ws, groups, extra_query):
        def fit_predict(train, test):
            calls.append((h.k, use_pseudo, tuple(train), tuple(test)))
            out = np.zeros((len(test), 3), np.float32)
            out[:, h.k] = 1.0  # says which fold's inputs answered
            return out
        return fit_predict

    monkeypatch.setattr(heads_stage, "fit_predict_fn", spy_fit_predict_fn)
    folds = [heads_stage.CrossFold(np.flatnonzero(fold == k),
                                   SimpleNamespace(k=k, labeled=np.arange(10, 16), labeled_y=labeled_y, test=None))
             for k in range(3)]
    oof = heads_stage.crossfit_oof("protonet", None, folds, use_pseudo=True)
    np.testing.assert_array_equal(oof.argmax(1), fold)  # row i answered by fold[i]'s inputs
    np.testing.assert_allclose(oof.sum(1), 1.0)  # and by that fold only
    assert sorted(test for _, _, _, (test,) in calls) == list(range(6))
    assert all(test not in train and use for _, use, train, (test,) in calls)  # LOO: never its own support
    assert all(len(train) == 5 for _, _, train, _ in calls)


def test_pseudo_labels_tied_to_no_label_stay_in_every_fit(monkeypatch):
    sizes = []

    class Spy:
        transductive, runs_encoder = False, False

        def fit(self, x, y, n_classes, query_x=None, support_weight=None):
            sizes.append(len(y))

        def predict_proba(self, x):
            return np.full((len(x), 2), 0.5, np.float32)

    monkeypatch.setattr(heads_stage, "make_head", lambda *args, **kwargs: Spy())
    h = heads_stage.HeadInputs(x=np.zeros((10, 2), np.float32), images=None, n_classes=2, labeled=np.arange(4),
                               labeled_y=np.array([0, 1, 0, 1]), test=np.arange(8, 10), pseudo=np.arange(4, 8),
                               pseudo_y=np.array([0, 1, 0, 1]), pseudo_w=np.ones(4, np.float32),
                               pseudo_group=np.array([0, 1, -1, -1]))  # rows 6, 7: a cross-fit fold's
    fit_predict = heads_stage.fit_predict_fn("knn", None, h, None, None, True, h.labeled, h.labeled_y,
                                             np.ones(4, np.float32), np.arange(4), h.test)
    leave_one_out(fit_predict, h.labeled_y)
    # holding out labeled row 0 (1) drops the pseudo row tied to it, never the untied two
    assert sizes == [3 + 3, 3 + 3, 3 + 4, 3 + 4]


def test_a_fold_hides_exactly_its_labels():
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(6)], "label": [7, 3, 7, 3, -1, -1],
                          "split": ["train", "train", "val", "val", "test", "train"]})
    data = CompetitionData(np.zeros((6, 2, 2, 3), np.uint8), index)  # integer labels, no classes.json
    fold = data.without_labels(np.array([0]))
    np.testing.assert_array_equal(fold.classes, [3, 7])  # the classes do not change
    np.testing.assert_array_equal(fold.labeled_idx, [1, 2, 3])
    np.testing.assert_array_equal(fold.class_ids, [-1, 0, 1, 0, -1, -1])
    np.testing.assert_array_equal(fold.unlabeled_idx, [0, 4, 5])  # the hidden image is unlabeled there
    np.testing.assert_array_equal(data.labeled_idx, [0, 1, 2, 3])  # the original is untouched
    named = CompetitionData(data.images, index.assign(label=[1, 0, 1, 0, -1, -1]), ["cat", "dog"])
    np.testing.assert_array_equal(named.without_labels(np.array([3])).class_ids, [1, 0, 1, -1, -1, -1])


def test_a_fold_count_that_cannot_work_stops_with_one_line(tmp_path, capsys):
    code, err = run_script("02_pseudo.py", "-c", "configs/demo.yaml", f"run.root={tmp_path}", "pseudo.crossfit_folds=1",
                           capsys=capsys)
    assert code == 2 and err.strip() == "error: pseudo.crossfit_folds: 0 (off), -1 (leave-one-out) or at least 2, got 1", err
    assert not any(tmp_path.iterdir())
    code, err = run_script("02_pseudo.py", "-c", "configs/demo.yaml", f"run.root={tmp_path}", "pseudo.crossfit_folds=-2",
                           capsys=capsys)
    assert code == 2 and err.strip().endswith("or at least 2, got -2"), err
    assert not any(tmp_path.iterdir())
    index = pd.DataFrame({"image_id": list("abcdefg"), "split": ["train"] * 6 + ["test"], "label": [0, 1] * 3 + [-1]})
    cfg = Config()
    cfg.pseudo.crossfit_folds = 4
    with pytest.raises(UserError, match=r"^pseudo.crossfit_folds: 4 folds, but a class has only 3 labeled image\(s\)"):
        pseudo_stage.validate_data(cfg, CompetitionData(np.zeros((7, 2, 2, 3), np.uint8), index, [0, 1]))
    cfg.pseudo.crossfit_folds = 3
    pseudo_stage.validate_data(cfg, CompetitionData(np.zeros((7, 2, 2, 3), np.uint8), index, [0, 1]))
    cfg.pseudo.crossfit_folds = -1  # leave-one-out: any class with two labeled images
    pseudo_stage.validate_data(cfg, CompetitionData(np.zeros((7, 2, 2, 3), np.uint8), index, [0, 1]))
    one = index.assign(label=[0, 1, 1, 1, 1, 1, -1])
    with pytest.raises(UserError, match=r"^pseudo.crossfit_folds: -1 \(leave-one-out\), but a class has only 1 labeled"):
        pseudo_stage.validate_data(cfg, CompetitionData(np.zeros((7, 2, 2, 3), np.uint8), one, [0, 1]))


def test_leave_one_out_folds_hold_out_one_labeled_image_each():
    index = pd.DataFrame({"image_id": list("abcdefg"), "split": ["train"] * 4 + ["val", "test", "test"],
                          "label": [1, 0, 1, 0, 1, -1, -1]})
    data = CompetitionData(np.zeros((7, 2, 2, 3), np.uint8), index, [0, 1])
    fold, spec = pseudo_stage.crossfit_spec(data, pseudo_stage.LEAVE_ONE_OUT)
    np.testing.assert_array_equal(fold, np.arange(5))
    assert spec == {"folds": 5, "leave_one_out": True, "fold_of": {k: i for i, k in enumerate("abcde")}}
    fold, spec = pseudo_stage.crossfit_spec(data, 2)
    np.testing.assert_array_equal(fold, [0, 0, 1, 1, 0])
    assert spec["folds"] == 2 and not spec["leave_one_out"]


def test_fold_paths_move_only_the_pseudo_stage(tmp_path):
    cfg = Config()
    cfg.run.root, cfg.run.name = str(tmp_path), "t"
    paths = RunPaths(cfg)
    fold = paths.crossfit_fold(1)
    assert fold.stage("pseudo") == paths.stage("pseudo") / "crossfit/fold1"
    assert fold.pseudo_labels() == fold.stage("pseudo") / "labels.csv"
    assert fold.pseudo_round(0) == fold.stage("pseudo") / "round0"
    assert fold.embeddings("ssl") == paths.embeddings("ssl") and fold.trunk_maps("ssl") == paths.trunk_maps("ssl")


def test_label_rounds_on_the_same_embeddings_share_one_knn_graph(monkeypatch):
    import src.transductive.graph as graph_module

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 8))
    emb = np.vstack([centers[i % 2] + 0.3 * rng.normal(size=8) for i in range(40)]).astype(np.float32)
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(40)], "split": ["train"] * 6 + ["test"] * 34,
                          "label": [0, 1, 0, 1, 0, 1] + [-1] * 34})
    data = CompetitionData(np.zeros((40, 2, 2, 3), np.uint8), index, [0, 1])
    cfg = Config()
    cfg.pseudo.labelers, cfg.pseudo.knn_k = ["propagation"], 5
    builds = []
    knn_graph = graph_module.knn_graph
    monkeypatch.setattr(graph_module, "knn_graph", lambda *a, **k: builds.append(1) or knn_graph(*a, **k))
    empty = np.zeros(0, np.int64)
    alone = [pseudo_stage.label_round(cfg, d, emb, None, empty, empty, None)[0] for d in (data, data.without_labels([0]))]
    assert len(builds) == 2
    shared = pseudo_stage.labeler_input(cfg, emb, None)
    both = [pseudo_stage.label_round(cfg, d, shared, None, empty, empty, None)[0] for d in (data, data.without_labels([0]))]
    assert len(builds) == 3  # one more graph for both rounds
    for a, b in zip(alone, both):
        pd.testing.assert_frame_equal(a, b)
    assert "i0" in set(both[1]["image_id"]) and "i0" not in set(both[0]["image_id"])  # the hidden label was relabeled
