"""Ensembling: combiners against hand values, weights from local CV only, and the stacker's folds
that must not leak (a planted leak is caught)."""
import numpy as np
import pytest
from sklearn.model_selection import KFold

from src.ensemble import (check_folds, fit_stacker, greedy_weights, group_folds, group_oof, leak_check, log_loss,
                          mean_probs, nested_weighted_oof, rank_average, stack_oof)
from src.errors import UserError


def noisy_onehot(rng, y, n_classes, acc):
    """Probabilities whose argmax is y with probability `acc`."""
    pred = np.where(rng.random(len(y)) < acc, y, rng.integers(0, n_classes, len(y)))
    p = np.full((len(y), n_classes), 0.1 / (n_classes - 1), np.float32)
    p[np.arange(len(y)), pred] = 0.9
    return p


def test_mean_and_rank_average_hand_values():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    b = np.array([[0.5, 0.5], [0.4, 0.6], [0.1, 0.9]], np.float32)
    np.testing.assert_allclose(mean_probs([a, b]), (a + b) / 2, atol=1e-6)
    np.testing.assert_allclose(mean_probs([a, b], np.array([3.0, 1.0])), 0.75 * a + 0.25 * b, atol=1e-6)
    # column ranks scaled to 0..1: a[:,0] -> (1, 0, .5), b[:,0] -> (1, .5, 0); class 1 the mirror
    r = rank_average([a, b])
    np.testing.assert_allclose(r[:, 0], [1.0, 0.25, 0.25], atol=1e-4)
    assert r[0].argmax() == 0 and np.allclose(r.sum(1), 1)


def test_greedy_weights_prefer_the_member_that_is_right_on_cv():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 60)
    good, bad = noisy_onehot(rng, y, 5, 0.9), noisy_onehot(rng, y, 5, 0.2)
    w = greedy_weights([bad, good], y, rounds=20)
    assert w.sum() == pytest.approx(1.0) and w[1] > 0.8
    assert log_loss(mean_probs([bad, good], w), y) <= log_loss(mean_probs([bad, good]), y)


def test_nested_weights_never_see_the_scored_row():
    """Row i of the nested weighted OOF must not change when only y[i] changes."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 20)
    oof = [noisy_onehot(rng, y, 3, a) for a in (0.9, 0.5, 0.3)]
    base = nested_weighted_oof(oof, y, rounds=10)
    for i in (0, 7, 19):
        y2 = y.copy()
        y2[i] = (y[i] + 1) % 3
        np.testing.assert_array_equal(nested_weighted_oof(oof, y2, rounds=10)[i], base[i])


def test_group_folds_keep_groups_together_and_check_catches_a_split():
    groups = np.repeat(np.arange(12), [1, 5, 2, 8, 1, 1, 3, 4, 2, 6, 1, 2])
    folds = group_folds(groups, 5, seed=0)
    assert len(np.unique(folds)) == 5
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    check_folds(groups, folds)
    broken = folds.copy()
    broken[np.flatnonzero(groups == 3)[0]] = (folds[groups == 3][0] + 1) % 5
    with pytest.raises(UserError, match="group 3 appears in more than one fold"):
        check_folds(groups, broken)


def test_group_oof_never_predicts_a_row_it_trained_on():
    folds = np.array([0, 1, 2, 0, 1, 2, 2])
    calls = []

    def spy(train, test):
        calls.append((train, test))
        return np.full((len(test), 2), 0.5, np.float32)

    oof = group_oof(spy, folds)
    assert oof.shape == (7, 2) and len(calls) == 3
    for train, test in calls:
        assert not set(train) & set(test) and len(set(folds[test])) == 1 and folds[test][0] not in folds[train]


def test_leak_check_passes_group_folds_and_catches_planted_leaks():
    honest = leak_check()
    assert not honest["leak"] and honest["stacker_accuracy"] < honest["limit"]

    def in_sample(fit_predict, folds):  # planted leak 1: features from a model that saw every label
        rows = np.arange(len(folds))
        return fit_predict(rows, rows)

    def plain_kfold(groups, n_folds, seed):  # planted leak 2: folds that split groups
        folds = np.empty(len(groups), np.int64)
        for f, (_, test) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(groups)):
            folds[test] = f
        return folds

    for kwargs in ({"oof_driver": in_sample}, {"fold_maker": plain_kfold}):
        leaky = leak_check(**kwargs)
        assert leaky["leak"] and leaky["stacker_accuracy"] > 0.8


def test_stacker_learns_which_member_to_trust():
    """Member A knows classes 0-1 and is flat (unsure) on 2-3, member B the reverse: the stacker
    learns to follow whichever is confident and beats both by far."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 800)
    a, b = np.full((800, 4), 0.25, np.float32), np.full((800, 4), 0.25, np.float32)
    a[y < 2] = noisy_onehot(rng, y[y < 2], 4, 0.95)
    b[y >= 2] = noisy_onehot(rng, y[y >= 2], 4, 0.95)
    feats = np.hstack([a, b])
    folds = group_folds(np.arange(len(y)), 4)
    oof = stack_oof(feats, y, folds, np.ones(len(y)), 4, rounds=40, lr=0.1, leaves=7)
    acc = (oof.argmax(1) == y).mean()
    assert acc > 0.9 and (a.argmax(1) == y).mean() < 0.75 and (b.argmax(1) == y).mean() < 0.75
    predict = fit_stacker(feats, np.zeros(len(y), int), np.ones(len(y)), 4)
    np.testing.assert_array_equal(predict(feats[:3]), np.tile([1, 0, 0, 0], (3, 1)))  # one class: constant
