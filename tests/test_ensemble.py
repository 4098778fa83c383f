"""Ensembling: combiners against hand values, weights from local CV only, and the stacker's folds
that must not leak (a planted leak is caught)."""
import numpy as np
import pytest
from sklearn.model_selection import KFold

from src.ensemble import (check_folds, fit_stacker, greedy_weights, group_folds, group_oof, leak_check, log_loss,
                          mean_probs, nested_weighted_oof, rank_average, rank_probs, stack_oof)
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
    # mid-rank percentiles among 3 rows: a[:,0] -> (5/6, 1/6, 1/2), b[:,0] -> (5/6, 1/2, 1/6); class 1 the mirror
    r = rank_average([a, b])
    np.testing.assert_allclose(r[:, 0], [5 / 6, 1 / 3, 1 / 3], atol=1e-4)
    assert r[0].argmax() == 0 and np.allclose(r.sum(1), 1)
    # weighted (3:1): class 0 -> 3/4 a's percentiles + 1/4 b's = (5/6, 1/4, 5/12)
    rw = rank_average([a, b], weights=np.array([3.0, 1.0]))
    np.testing.assert_allclose(rw[:, 0], [5 / 6, 1 / 4, 5 / 12], atol=1e-4)


def test_rank_average_scores_query_rows_among_the_reference_rows():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    test = [rng.dirichlet(np.ones(4), 200).astype(np.float32) for _ in range(3)]
    # the test rows' argmax is that of the plain column-rank average (scipy's rankdata)
    plain = np.mean([np.stack([rankdata(p[:, c]) for c in range(4)], 1) for p in test], 0)
    assert (rank_average(test).argmax(1) == plain.argmax(1)).all()
    # a labeled row equal to test row 7 of every member scores exactly as that test row does
    query = [p[[7, 11]] for p in test]
    np.testing.assert_allclose(rank_average(query, test), rank_average(test)[[7, 11]], atol=1e-6)
    # ranked among themselves, two rows are just first and second: not the test rows' scale
    assert not np.allclose(rank_average(query), rank_average(test)[[7, 11]], atol=1e-3)


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


# ------------------------------------------------------------------------------------------------
# Rules (src.ensemble.RULES): shared by 06_submit and the re-draw evaluator
# ------------------------------------------------------------------------------------------------
from src.ensemble import (RULES, Members, RuleParams, agreement_weights, apply_rules, nested_choice,  # noqa: E402
                          shrink_weights)


def members_case(seed=0, accs=(0.9, 0.6, 0.3), n_lab=30, n_test=400, c=5, transductive=(True, False, False)):
    rng = np.random.default_rng(seed)
    y, truth = np.arange(n_lab) % c, rng.integers(0, c, n_test)
    oof = [noisy_onehot(rng, y, c, a) for a in accs]
    probs = [noisy_onehot(rng, truth, c, a) for a in accs]
    names = [f"m{k}" for k in range(len(accs))]
    return Members(names, oof, probs, y, list(transductive)), truth


def test_agreement_weights_find_the_accurate_members_without_labels():
    m, truth = members_case(accs=(0.9, 0.85, 0.2, 0.2))
    w = agreement_weights(m.probs)
    assert w.sum() == pytest.approx(1.0) and w[0] > w[2] and w[1] > w[3]
    assert w[2] < 0.1 and w[3] < 0.1  # near-chance members get (almost) nothing
    # hand case: 3 members on 4 rows, member 2 always disagrees with the other two
    eye = np.eye(3, dtype=np.float32)
    a = eye[[0, 1, 2, 0]]
    b = eye[[0, 1, 2, 0]]
    c = eye[[1, 2, 0, 1]]
    w = agreement_weights([a, b, c], iters=5)
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0], atol=1e-6)


def sharp_and_flat_members(seed=0, n_test=2000, c=10):
    """One overconfident member that says the true class on half the rows and a random class on the
    rest (near one-hot probabilities, right on about 57 %), and three independent members that say it
    on 70 % (right on 67-70 %) with flat probabilities (top probability about 0.23)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, c, n_test)

    def member(acc, scale):
        said = np.where(rng.random(n_test) < acc, truth, rng.integers(0, c, n_test))
        logits = scale * np.eye(c)[said] + rng.normal(0, 0.3, (n_test, c))
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    probs = [member(0.5, 12.0)] + [member(0.7, 1.0) for _ in range(3)]
    return Members(["sharp", "flat0", "flat1", "flat2"], [p[:30] for p in probs], probs, truth[:30]), truth


def test_agreement_rank_weighs_members_on_one_scale():
    from src.ensemble import accuracy, percentile_ranks

    m, truth = sharp_and_flat_members()
    accs = [accuracy(p, truth) for p in m.probs]  # about 0.57, 0.68, 0.67, 0.70
    plain, ranked = RULES["agreement"](m, RuleParams()), RULES["agreement_rank"](m, RuleParams())
    # the sharp member carries the mean of probabilities: agreement trusts it and submits its argmax
    assert plain.weights.argmax() == 0 and accuracy(plain.test, truth) == pytest.approx(accs[0], abs=0.01)
    # on ranks the three accurate members outweigh it, and the rule beats every member
    assert ranked.weights[0] < ranked.weights[1:].min() and ranked.weights.sum() == pytest.approx(1)
    assert accuracy(ranked.test, truth) > max(accs) + 0.05
    # the weights are agreement_weights on the percentile ranks; the output is the weighted rank average
    # as probabilities, one tau for the test and LOO rows
    w = agreement_weights([percentile_ranks(p, p) for p in m.probs])
    np.testing.assert_allclose(ranked.weights, w, atol=1e-6)
    test, oof = rank_probs(rank_average(m.probs, weights=w), rank_average(m.oof, m.probs, w), mean_probs(m.probs, w))
    np.testing.assert_allclose(ranked.test, test, atol=1e-6)
    np.testing.assert_allclose(ranked.oof, oof, atol=1e-6)
    assert (ranked.test.argmax(1) == rank_average(m.probs, weights=w).argmax(1)).all()
    # equal weights give the rank rule
    np.testing.assert_allclose(rank_probs(rank_average(m.probs, weights=np.ones(4)), rank_average(m.oof, m.probs),
                                          mean_probs(m.probs))[0], RULES["rank"](m, RuleParams()).test, atol=1e-6)


def test_rank_probs_keep_the_argmax_on_the_members_confidence_scale():
    from src.ensemble import confidence_matching_tau, softmax_scores

    np.testing.assert_allclose(softmax_scores(np.array([[1.0, 0.0]]), 1.0)[0], [np.e / (1 + np.e), 1 / (1 + np.e)],
                               atol=1e-6)
    rng = np.random.default_rng(0)
    scores = rng.random((500, 10))  # (T, C) mean percentile ranks
    like = rng.dirichlet(np.full(10, 0.3), 500)  # (T, C) the members' mean probabilities
    test, oof = rank_probs(scores, scores[[3, 9]], like)
    assert (test.argmax(1) == scores.argmax(1)).all() and np.allclose(test.sum(1), 1, atol=1e-5)
    assert test.max(1).mean() == pytest.approx(like.max(1).mean(), abs=1e-3)
    np.testing.assert_allclose(oof, test[[3, 9]], atol=1e-6)  # a LOO row scored as the same test row
    # a higher target confidence needs a lower temperature
    assert confidence_matching_tau(scores, 0.6) < confidence_matching_tau(scores, 0.3)


def test_rank_rules_submit_probabilities_not_renormalised_ranks():
    m, truth = sharp_and_flat_members()
    for name in ("rank", "agreement_rank"):
        out = RULES[name](m, RuleParams())
        ranks = rank_average(m.probs, weights=out.weights)
        renormalised = ranks / ranks.sum(1, keepdims=True)
        assert (out.test.argmax(1) == ranks.argmax(1)).all()
        # renormalised ranks put about 0.2 on every top class: a log-loss near chance's log(10) = 2.3
        assert log_loss(out.test, truth) < log_loss(renormalised, truth) - 0.2, name


def test_shrink_weights_are_uniform_when_the_loo_spread_is_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 30)
    same = [noisy_onehot(np.random.default_rng(k), y, 5, 0.8) for k in range(3)]
    accs = [float((o.argmax(1) == y).mean()) for o in same]
    w, r = shrink_weights(same, y, rounds=20)
    # spread of a few points against a binomial se of ~7 points: pure noise -> uniform
    assert np.var(accs) < 0.8 * 0.2 / 30 and r == 0.0 and np.allclose(w, 1 / 3)
    good, bad = noisy_onehot(rng, y, 5, 1.0), noisy_onehot(rng, y, 5, 0.0)
    w, r = shrink_weights([bad, good], y, rounds=20)
    assert r > 0.8 and w[1] > 0.9  # a spread far above the noise: trust the greedy weights


def test_nested_choice_never_reads_the_scored_row():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 20)
    cands = [noisy_onehot(rng, y, 3, a) for a in (0.8, 0.75, 0.4)]
    base = nested_choice(cands, y)
    for i in (0, 5, 19):
        y2 = y.copy()
        y2[i] = (y[i] + 1) % 3
        np.testing.assert_array_equal(nested_choice(cands, y2)[i], base[i])


def test_rules_hand_values_and_errors():
    m, _ = members_case()
    p = RuleParams(preferred=["nope", "m1"], auto_candidates=["mean", "best"])
    out = apply_rules(["mean", "best", "agreement", "transductive", "preferred", "shrunk", "weighted", "rank", "auto"],
                      m, p)
    np.testing.assert_allclose(out["mean"].test, mean_probs(m.probs), atol=1e-6)
    np.testing.assert_array_equal(out["best"].test, m.probs[0])  # m0 has the best LOO
    np.testing.assert_array_equal(out["transductive"].test, m.probs[0])  # the only transductive member
    np.testing.assert_array_equal(out["preferred"].test, m.probs[1])  # first preferred name that is a member
    assert out["agreement"].weights.argmax() == 0 and out["agreement"].weights.sum() == pytest.approx(1)
    # auto = the candidate with the best local CV, reusing the candidates' outputs
    best_cand = "best" if (out["best"].oof.argmax(1) == m.y).mean() > (out["mean"].oof.argmax(1) == m.y).mean() \
        else "mean"
    np.testing.assert_array_equal(out["auto"].test, out[best_cand].test)
    for r in out.values():
        assert r.oof.shape == m.oof[0].shape and r.test.shape == m.probs[0].shape
    with pytest.raises(UserError, match="no transductive member"):
        RULES["transductive"](Members(m.names, m.oof, m.probs, m.y, [False] * 3), p)
    with pytest.raises(UserError, match="ensemble.preferred: none of nope"):
        RULES["preferred"](m, RuleParams(preferred=["nope"]))
    # preferred_mean: the equal-weight mean of every preferred member present, in member order
    both = RULES["preferred_mean"](m, RuleParams(preferred=["m2", "nope", "m0"]))
    np.testing.assert_allclose(both.test, (m.probs[0] + m.probs[2]) / 2, atol=1e-6)
    np.testing.assert_allclose(both.oof, (m.oof[0] + m.oof[2]) / 2, atol=1e-6)
    np.testing.assert_allclose(both.weights, [0.5, 0.0, 0.5])
    with pytest.raises(UserError, match="ensemble.preferred: none of nope"):
        RULES["preferred_mean"](m, RuleParams(preferred=["nope"]))
    with pytest.raises(UserError, match="no member has stacker features"):
        RULES["stack"](m, p)
    with pytest.raises(UserError, match="ensemble.method: unknown rule 'nope'"):
        apply_rules(["nope"], m, p)


def test_rules_read_no_truth():
    """Rules take Members only: scrambling the test truth cannot change what they output (spy on
    the arguments: no array a rule receives equals the truth)."""
    m, truth = members_case(seed=4)
    p = RuleParams(auto_candidates=["mean", "weighted", "rank"], preferred=["m0"])
    names = ["mean", "weighted", "rank", "best", "shrunk", "agreement", "transductive", "top", "gated", "auto",
             "estimated"]
    first = apply_rules(names, m, p)
    again = apply_rules(names, m, p)  # deterministic
    for n in names:
        np.testing.assert_array_equal(first[n].test, again[n].test)
    received = [m.y, *m.oof, *m.probs]
    assert not any(a.shape == truth.shape and (a == truth).all() for a in received)


def test_estimated_rule_takes_the_member_with_the_highest_estimate_and_nests_its_cv():
    m, _ = members_case(seed=3)
    out = RULES["estimated"](m, RuleParams(estimator="loo"))
    np.testing.assert_array_equal(out.test, m.probs[0])  # the most accurate member has the highest LOO
    assert out.weights.tolist() == [1.0, 0.0, 0.0] and "m0" in out.note
    # nested: row i's choice is made without row i (LOO: the best member on the other rows)
    np.testing.assert_allclose(out.oof, nested_choice_by_accuracy(m.oof, m.y), atol=1e-6)


def nested_choice_by_accuracy(oof, y):
    rows = np.arange(len(y))
    pick = [int(np.argmax([(o[rows != i].argmax(1) == y[rows != i]).mean() for o in oof])) for i in rows]
    return np.stack([oof[k][i] for i, k in enumerate(pick)])


def oof_correct_on(y, n_correct, c):
    """One-hot OOF probabilities right on the first n_correct rows, wrong (y+1) on the rest."""
    pred = np.where(np.arange(len(y)) < n_correct, y, (y + 1) % c)
    return np.eye(c, dtype=np.float32)[pred]


def test_top_rule_keeps_the_members_within_one_standard_error():
    y = np.arange(30) % 5
    oof = [oof_correct_on(y, n, 5) for n in (27, 26, 24)]  # LOO 0.90, 0.867, 0.80; se at 0.9: 0.0548
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(5), 50).astype(np.float32) for _ in range(3)]
    m = Members(["a", "b", "c"], oof, probs, y, [False] * 3)
    out = RULES["top"](m, RuleParams())
    np.testing.assert_allclose(out.weights, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out.test, (probs[0] + probs[1]) / 2, atol=1e-6)
    assert "a, b" in out.note
    # nested CV: row 0 (right for every member) is combined over the set chosen without it:
    # a 26/29, b 25/29, c 23/29, se at 26/29 = 0.0566 -> a, b again
    np.testing.assert_allclose(out.oof[0], (oof[0][0] + oof[1][0]) / 2, atol=1e-6)


def test_gated_rule_is_the_mean_when_members_agree_else_the_preferred_member():
    rng = np.random.default_rng(1)
    y = np.arange(30) % 3
    base = rng.dirichlet(np.ones(3), 100).astype(np.float32)
    near = base.copy()
    near[:5] = near[:5, ::-1]  # agrees with base on >= 95% of rows
    oof = [oof_correct_on(y, 20, 3)] * 2
    m = Members(["pt_map", "knn"], oof, [base, near], y, [True, False])
    p = RuleParams(preferred=["propagation", "pt_map"], gate_agreement=0.9)
    np.testing.assert_allclose(RULES["gated"](m, p).test, RULES["mean"](m, p).test)
    far = rng.dirichlet(np.ones(3), 100).astype(np.float32)  # agrees ~1/3 of the time
    m2 = Members(["pt_map", "knn"], oof, [base, far], y, [True, False])
    out = RULES["gated"](m2, p)
    np.testing.assert_array_equal(out.test, base)
    np.testing.assert_array_equal(out.weights, [1, 0])
    assert "< 0.9: fixed member pt_map" in out.note
    with pytest.raises(UserError, match="ensemble.preferred: none of nope"):
        RULES["gated"](m2, RuleParams(preferred=["nope"], gate_agreement=1.0))


def test_count_once_makes_a_family_of_shared_errors_one_voter():
    """Two independent heads (90 % right) and a meta family of four methods that share one set of
    errors (65 % right): counted as four voters the family outvotes the heads and the agreement
    rule follows its errors; counted once (ensemble.count_once=[meta]) the rule is a majority of three
    that beats both heads. Weights of a merged member spread evenly over its methods."""
    from src.ensemble import Members, RuleParams, apply_rules, count_once, estimate_context

    rng = np.random.default_rng(0)
    c, n = 5, 4000
    y = rng.integers(0, c, n)
    heads = [noisy_onehot(rng, y, c, 0.9) for _ in range(2)]
    family = noisy_onehot(rng, y, c, 0.65)
    meta = [np.clip(family + rng.normal(0, 0.01, family.shape), 0, None).astype(np.float32) for _ in range(4)]
    meta = [p / p.sum(1, keepdims=True) for p in meta]
    probs = heads + meta
    m = Members(names=["knn", "propagation"] + [f"meta_{k}" for k in "abcd"], oof=[p[:30] for p in probs],
                probs=probs, y=y[:30], transductive=[False] * 6, sources=["heads"] * 2 + ["meta"] * 4)

    def agreement_accuracy(once):
        test = apply_rules(["agreement"], m, RuleParams(count_once=once))["agreement"].test
        return float((test.argmax(1) == y).mean())

    best_head = max(float((h.argmax(1) == y).mean()) for h in heads)
    assert agreement_accuracy([]) < 0.75 < best_head + 0.02 < agreement_accuracy(["meta"])
    merged, spread = count_once(m, ["meta"])
    assert merged.names == ["knn", "propagation", "meta"] and merged.sources == ["heads", "heads", "meta"]
    np.testing.assert_allclose(merged.probs[2], mean_probs(meta), atol=1e-6)
    np.testing.assert_allclose(spread.sum(0), [1, 1, 0.25, 0.25, 0.25, 0.25])
    mean = apply_rules(["mean"], m, RuleParams(count_once=["meta"]))["mean"]
    np.testing.assert_allclose(mean.weights, [1 / 3, 1 / 3, 1 / 12, 1 / 12, 1 / 12, 1 / 12])
    assert "counted once: meta" in mean.note
    assert count_once(m, [])[0] is m and len(estimate_context(m, RuleParams()).probs) == 3
