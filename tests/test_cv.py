"""Local CV drivers: reference values for the Wilson interval, and spies that prove a held-out row
is never given to fit."""
import numpy as np
import pytest

from src.cv import cv_summary, episodic_estimate, leave_one_out, support_redraws, wilson_interval


@pytest.mark.parametrize("correct, n, lo, hi", [
    (8, 10, 0.4902, 0.9433),   # the textbook example (Wilson 1927; Newcombe 1998 table I)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (27, 30, 0.7438, 0.9654),
])
def test_wilson_interval_reference_values(correct, n, lo, hi):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_interval_is_narrower_with_more_data():
    lo30, hi30 = wilson_interval(24, 30)
    lo300, hi300 = wilson_interval(240, 300)
    assert hi300 - lo300 < (hi30 - lo30) / 2 and lo30 < 0.8 < hi30 and wilson_interval(0, 0) == (0.0, 1.0)


def oracle(labels, n_classes, calls):
    """A fit_predict spy: records every call and predicts the true label (one-hot)."""
    def fit_predict(train_rows, test_rows):
        calls.append((np.array(train_rows), np.array(test_rows)))
        out = np.zeros((len(test_rows), n_classes), np.float32)
        out[np.arange(len(test_rows)), labels[test_rows]] = 1.0
        return out
    return fit_predict


def test_leave_one_out_never_fits_on_the_held_out_row():
    labels = np.repeat(np.arange(10), 3)
    calls = []
    oof = leave_one_out(oracle(labels, 10, calls), labels)
    assert len(calls) == 30
    for i, (train, test) in enumerate(calls):
        assert test.tolist() == [i] and i not in train and len(train) == 29
    summary = cv_summary(oof, labels)
    assert summary["accuracy"] == 1.0 and summary["correct"] == 30 and summary["n"] == 30
    assert summary["interval"] == pytest.approx(list(wilson_interval(30, 30)))


def test_leave_one_out_majority_vote_reference():
    """A majority-class predictor under LOO: known answer (the held-out row shifts the majority)."""
    labels = np.array([0, 0, 0, 1, 1])

    def majority(train, test):
        counts = np.bincount(labels[train], minlength=2)
        out = np.zeros((len(test), 2), np.float32)
        out[:, counts.argmax()] = 1
        return out

    oof = leave_one_out(majority, labels)
    # holding out a 0 leaves 2 vs 2 -> argmax picks 0 (correct); holding out a 1 leaves 3 vs 1 -> 0 (wrong)
    assert cv_summary(oof, labels)["correct"] == 3


def test_support_redraws_draw_k_per_class_and_score_the_rest():
    labels = np.repeat(np.arange(5), 3)
    calls = []
    result = support_redraws(oracle(labels, 5, calls), labels, shots=(1, 2, 3), n_draws=7, seed=0)
    assert len(calls) == 14
    for train, test in calls:
        k = len(train) // 5
        assert np.all(np.bincount(labels[train], minlength=5) == k)
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    assert result["1-shot"]["mean"] == 1.0 and result["1-shot"]["std"] == 0.0 and result["2-shot"]["n_query"] == 5
    assert "skipped" in result["3-shot"]

    def always_zero(train, test):
        out = np.zeros((len(test), 5), np.float32)
        out[:, 0] = 1
        return out

    r = support_redraws(always_zero, labels, shots=(1,), n_draws=5)
    assert r["1-shot"]["mean"] == pytest.approx(0.2)  # 2 of the 10 held-out rows are class 0


def test_episodic_estimate_oracle_chance_and_disjoint_sets():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    calls = []
    res = episodic_estimate(oracle(labels, 10, calls), labels, n_way=5, n_shot=2, n_query=4, episodes=50)
    assert res["mean"] == 1.0 and len(calls) == 50 and "biased" in res["note"]
    for train, test in calls:
        assert not set(train) & set(test) and len(train) == 10 and len(test) == 20
        assert len(np.unique(labels[train])) == 5 and set(labels[test]) == set(labels[train])

    def uniform_random(train, test):
        return rng.random((len(test), 10)).astype(np.float32)

    res = episodic_estimate(uniform_random, labels, n_way=5, n_shot=2, n_query=4, episodes=400, seed=1)
    # only the episode's 5 classes compete: chance is 1/5, not 1/10
    assert res["interval"][0] < 0.2 < res["interval"][1]
    assert "skipped" in episodic_estimate(uniform_random, labels[:20], n_way=5, n_shot=2, n_query=15)
