"""Accuracy estimators (src/estimate.py) on synthetic members whose true accuracy is known:
independent noisy labelers (Dawid-Skene's model), calibrated probabilities (confidence, DoC, ATC),
and the one thing none may do: read truth."""
import inspect

import numpy as np
import pytest

from src import estimate
from src.estimate import ESTIMATORS, EstimateContext, atc_fraction, dawid_skene, estimate_all


def noisy_labelers(accs, n=4000, c=10, n_labeled=30, seed=0):
    """Truth (n,), labeled truth (L,), and per member one-hot-ish probabilities on test and labeled
    rows. Row i has a confidence c_i spread evenly around acc; it is right with probability c_i,
    else a uniformly random other class; its top probability is c_i (calibrated) and the rest is
    spread evenly."""
    rng = np.random.default_rng(seed)
    truth, y = rng.integers(0, c, n), np.repeat(np.arange(c), n_labeled // c)

    def member(acc, t):
        w = min(1 - acc, acc - 0.15)
        conf = acc + rng.uniform(-w, w, len(t))  # (n,)
        right = rng.random(len(t)) < conf
        other = (t + rng.integers(1, c, len(t))) % c
        lab = np.where(right, t, other)
        p = np.repeat(((1 - conf) / (c - 1))[:, None], c, 1)
        p[np.arange(len(t)), lab] = conf
        return p

    probs, oof = zip(*[(member(a, truth), member(a, y)) for a in accs])
    return truth, y, list(probs), list(oof)


def acc(p, t):
    return float((p.argmax(1) == t).mean())


def test_dawid_skene_recovers_independent_labelers_accuracies():
    accs = [0.9, 0.75, 0.6, 0.5, 0.4]
    truth, y, probs, oof = noisy_labelers(accs)
    z = np.stack([p.argmax(1) for p in probs])
    a, q = dawid_skene(z, 10)
    realised = [acc(p, truth) for p in probs]
    np.testing.assert_allclose(a, realised, atol=0.02)
    assert q.shape == (len(truth), 10) and np.allclose(q.sum(1), 1)
    assert acc(q, truth) >= max(realised)  # the posterior beats the best member
    ctx = EstimateContext(probs, oof, y)
    for p in probs:  # the estimator of each member: its realised accuracy
        e = estimate.est_dawid_skene(p, p[:30], ctx)
        assert e.value == pytest.approx(acc(p, truth), abs=0.02) and e.lo <= e.value <= e.hi


def test_dawid_skene_uses_known_rows():
    """Two members that always agree and a third: without known rows the pair looks right; known
    rows where the pair is wrong and the third right turn the accuracies around."""
    c, t = 3, 300
    rng = np.random.default_rng(1)
    pair = rng.integers(0, c, t)
    third = (pair + 1) % c
    z = np.stack([pair, pair, third])
    a_free, _ = dawid_skene(z, c)
    assert a_free[0] > a_free[2]
    known_truth = rng.integers(0, c, 600)
    known = np.stack([(known_truth + 1) % c, (known_truth + 1) % c, known_truth])
    a_known, _ = dawid_skene(z, c, known, known_truth)
    assert a_known[2] > a_known[0]


def test_confidence_doc_atc_on_calibrated_members():
    truth, y, probs, oof = noisy_labelers([0.8, 0.6], n=5000, n_labeled=2000)
    ctx = EstimateContext(probs, oof, y)
    for p, o in zip(probs, oof):
        want = acc(p, truth)
        for name in ("confidence", "doc", "atc", "atc_ne", "temperature", "temperature_wilson", "blend"):
            e = ESTIMATORS.get(name)(p, o, ctx)
            assert e.value == pytest.approx(want, abs=0.03), name
            assert e.lo <= e.value <= e.hi


def test_disagreement_equals_accuracy_on_a_calibrated_ensemble_and_skips_the_prediction_itself():
    """GDE's premise (Jiang et al. 2022): on test image i every independently trained copy says class
    0 with probability p_i, and the truth is class 0 with probability p_i too (class-wise calibrated).
    A copy's accuracy and its agreement with another copy are then both E[p^2 + (1 - p)^2]."""
    rng = np.random.default_rng(0)
    n, k = 40000, 5
    p0 = rng.uniform(0.5, 1.0, n)
    truth = np.where(rng.random(n) < p0, 0, 1)
    copies = []
    for _ in range(k):
        z = np.where(rng.random(n) < p0, 0, 1)
        copies.append(np.eye(3)[z] * 0.8 + 0.1)  # (n, 3) probabilities, argmax z
    y = np.array([0, 1, 2])
    ctx = EstimateContext(copies, [np.eye(3)] * k, y)
    for p in copies:
        e = ESTIMATORS.get("disagreement")(p, np.eye(3), ctx)  # its own argmax is no copy of it
        assert e.value == pytest.approx(acc(p, truth), abs=0.01) and e.lo <= e.value <= e.hi
        rates = estimate.agreement_rates(p.argmax(1), [q.argmax(1) for q in copies if q is not p])
        assert e.value == pytest.approx(rates.mean()) and (e.lo, e.hi) == (rates.min(), rates.max())
    # a rule that submits a member's argmax: that member is skipped, the others are its copies
    rule = copies[0] * 2.0
    assert ESTIMATORS.get("disagreement")(rule, np.eye(3), ctx).value == pytest.approx(
        estimate.agreement_rates(rule.argmax(1), [q.argmax(1) for q in copies[1:]]).mean())
    # a single member has no copy: the estimate is its LOO
    alone = EstimateContext(copies[:1], [np.eye(3)[[0, 0, 2]]], y)
    got = ESTIMATORS.get("disagreement")(copies[0], alone.oof[0], alone)
    assert got == estimate.est_loo(copies[0], alone.oof[0], alone)


def test_agreement_line_and_aline_against_a_hand_computation():
    from scipy.stats import norm

    # three members on 10 labeled rows and 8 test rows: pairwise agreements (0.8, 0.6, 0.6) / (0.75, 0.5, 0.5)
    lab = [np.zeros(10, int), np.r_[np.zeros(8, int), 1, 1], np.r_[np.zeros(6, int), 2, 2, 2, 2]]
    tst = [np.zeros(8, int), np.r_[np.zeros(6, int), 1, 1], np.r_[np.zeros(4, int), 2, 2, 2, 2]]
    # agreements: (0,1) 0.8 / 0.75, (0,2) 0.6 / 0.5, (1,2) 0.6 / 0.5
    a, b = estimate.agreement_line(lab, tst)
    want = np.polyfit(norm.ppf([0.8, 0.6, 0.6]), norm.ppf([0.75, 0.5, 0.5]), 1)
    assert (a, b) == (pytest.approx(want[0]), pytest.approx(want[1]))
    assert estimate.agreement_line(lab[:2], tst[:2]) is None  # one pair: no line
    assert estimate.agreement_line([lab[0]] * 3, tst) is None  # one labeled agreement: no line
    # test agreements falling where the labeled ones rise: a slope <= 0 is no line
    assert estimate.agreement_line(lab, [np.zeros(8, int), np.r_[np.zeros(2, int), np.ones(6, int)], np.zeros(8, int)]) is None
    probs = [np.eye(3)[z] for z in tst]
    oof = [np.eye(3)[z] for z in lab]
    y = np.zeros(10, int)  # member 1 is right on 8 of 10 labeled rows
    ctx = EstimateContext(probs, oof, y)
    e = estimate.est_aline(probs[1], oof[1], ctx)
    loo = estimate.est_loo(probs[1], oof[1], ctx)
    assert e.value == pytest.approx(norm.cdf(a * norm.ppf(0.8) + b))
    assert (e.lo, e.hi) == (pytest.approx(norm.cdf(a * norm.ppf(loo.lo) + b)), pytest.approx(norm.cdf(a * norm.ppf(loo.hi) + b)))
    e0 = estimate.est_aline(probs[0], oof[0], ctx)  # LOO 1.0: clipped to 1 - 1/20 before the probit
    assert e0.value == pytest.approx(norm.cdf(a * norm.ppf(0.95) + b))
    alone = EstimateContext(probs[:2], oof[:2], y)
    assert estimate.est_aline(probs[1], oof[1], alone) == estimate.est_loo(probs[1], oof[1], alone)


def test_aline_without_shift_is_the_accuracy():
    """Test images that repeat the labeled rows (no shift at all): the line is the identity and ALine
    the accuracy."""
    _, y, _, oof = noisy_labelers([0.85, 0.7, 0.6, 0.5], n=30, n_labeled=300)
    probs, truth = [np.tile(o, (3, 1)) for o in oof], np.tile(y, 3)
    ctx = EstimateContext(probs, oof, y)
    a, b = ctx.aline_fit
    assert (a, b) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-9))
    for p, o in zip(probs, oof):
        assert estimate.est_aline(p, o, ctx).value == pytest.approx(acc(p, truth))


def test_ppi_estimate_against_a_hand_computation():
    """PPI++ on five labeled rows and four test rows: lambda, theta and the interval by hand."""
    right = np.array([1, 1, 0, 1, 0], float)
    f_l = np.array([0.9, 0.7, 0.4, 0.8, 0.2])
    f_t = np.array([0.6, 0.9, 0.5, 0.8])
    n, big_n = 5, 4
    lam = min(1.0, np.cov(right, f_l)[0, 1] / ((1 + n / big_n) * np.var(f_l, ddof=1)))
    theta = right.mean() + lam * (f_t.mean() - f_l.mean())
    sd = np.sqrt(np.var(right - lam * f_l, ddof=1) / n + lam ** 2 * np.var(f_t) / big_n)
    e = estimate.ppi_estimate(right, f_l, f_t)
    assert 0 < lam < 1
    assert (e.value, e.lo, e.hi) == (pytest.approx(theta), pytest.approx(theta - 1.96 * sd), pytest.approx(min(1.0, theta + 1.96 * sd)))
    # a proxy that does not vary on the labeled rows carries nothing: the labeled mean, Wald-like interval
    flat = estimate.ppi_estimate(right, np.full(5, 0.5), f_t)
    assert flat.value == pytest.approx(0.6) and flat.lo == pytest.approx(0.6 - 1.96 * np.sqrt(0.3 / 5))
    # a proxy anti-correlated with correctness: lambda clips to 0
    assert estimate.ppi_estimate(right, 1 - f_l, f_t).value == pytest.approx(0.6)


def test_ppi_reads_the_test_images_where_the_labels_are_few():
    """Independent noisy labelers: PPI++ with the label-free Dawid-Skene proxy recovers every member's
    accuracy from 30 labels closer than their LOO does, its interval narrower than the LOO's and holding
    the truth; the proxy is fitted without the labeled rows' classes."""
    errs_ppi, errs_loo = [], []
    for seed in range(5):
        truth, y, probs, oof = noisy_labelers([0.85, 0.7, 0.6, 0.5, 0.45], n=3000, seed=seed)
        ctx = EstimateContext(probs, oof, y)
        for p, o in zip(probs, oof):
            e, loo = estimate.est_ppi(p, o, ctx), estimate.est_loo(p, o, ctx)
            errs_ppi.append(abs(e.value - acc(p, truth)))
            errs_loo.append(abs(loo.value - acc(p, truth)))
            assert e.lo <= acc(p, truth) <= e.hi and e.hi - e.lo < loo.hi - loo.lo
    assert np.mean(errs_ppi) < 0.6 * np.mean(errs_loo)
    scrambled = EstimateContext(probs, oof, (y + 1) % 10)  # the proxy does not move with the labels
    for a, b in zip(ctx.ds_label_free, scrambled.ds_label_free):
        np.testing.assert_array_equal(a, b)


def test_atc_fraction_counts_rows_above_the_threshold_and_splits_ties():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    right = np.array([1, 1, 0, 1, 0], bool)  # 3 of 5 right: t between 0.7 and 0.6
    assert atc_fraction(conf, right, conf) == pytest.approx(0.6)
    assert atc_fraction(conf, right, np.array([0.95, 0.75, 0.65, 0.55])) == pytest.approx(0.5)  # 0.95 and 0.75 >= 0.7
    assert atc_fraction(conf, np.zeros(5, bool), conf) == 0.0
    assert atc_fraction(conf, np.ones(5, bool), conf) == 1.0
    # every row tied (a one-hot head): the threshold takes the labeled accuracy's share of the tie
    ones = np.ones(10)
    assert atc_fraction(ones, np.arange(10) < 7, np.ones(300)) == pytest.approx(0.7)


def test_loo_and_blend():
    """LOO is the labeled rows' accuracy; blend is the mean of its four parts, its interval at least the LOO's width."""
    truth, y, probs, oof = noisy_labelers([0.9, 0.7, 0.6])
    ctx = EstimateContext(probs, oof, y)
    loo = estimate.est_loo(probs[0], oof[0], ctx)
    assert loo.value == pytest.approx(acc(oof[0], y))
    parts = [ESTIMATORS.get(n)(probs[0], oof[0], ctx) for n in estimate.BLEND]
    blend = estimate.est_blend(probs[0], oof[0], ctx)
    assert blend.value == pytest.approx(np.mean([e.value for e in parts]))
    # bounds: the parts' mean, moved out to the LOO's Wilson half-width about the value where that is wider
    lo, hi = np.mean([e.lo for e in parts]), np.mean([e.hi for e in parts])
    assert blend.lo == pytest.approx(max(0.0, min(lo, blend.value - (loo.value - loo.lo))))
    assert blend.hi == pytest.approx(min(1.0, max(hi, blend.value + (loo.hi - loo.value))))
    assert blend.lo <= blend.value <= blend.hi and blend.hi - blend.lo >= min(hi - lo, loo.hi - loo.lo) - 1e-9
    wide = estimate.blend_of(parts, estimate.Estimate(0.5, 0.0, 1.0))  # a Wilson interval wider than the parts'
    assert (wide.lo, wide.hi) == (pytest.approx(max(0.0, blend.value - 0.5)), pytest.approx(min(1.0, blend.value + 0.5)))
    narrow = estimate.blend_of(parts, estimate.Estimate(0.5, 0.5, 0.5))  # a point: the parts' mean stands
    assert (narrow.lo, narrow.hi) == (pytest.approx(lo), pytest.approx(hi))
    out = estimate_all(probs[0], oof[0], ctx)
    assert set(out) == set(ESTIMATORS.names()) and all(0 <= v["estimate"] <= 1 for v in out.values())
    assert out["blend"] == blend.as_dict()


def test_temperature_wilson_is_temperature_with_the_wilson_floor(monkeypatch):
    """Its value is temperature scaling's; its interval the bootstrap's, moved out to the LOO's Wilson
    half-widths about the value where those are wider; estimate_all fits the temperatures once for both."""
    truth, y, probs, oof = noisy_labelers([0.8, 0.6])
    ctx = EstimateContext(probs, oof, y)
    temp, loo = estimate.est_temperature(probs[1], oof[1], ctx), estimate.est_loo(probs[1], oof[1], ctx)
    tw = estimate.est_temperature_wilson(probs[1], oof[1], ctx)
    assert tw.value == temp.value
    assert tw.lo == pytest.approx(max(0.0, min(temp.lo, temp.value - (loo.value - loo.lo))))
    assert tw.hi == pytest.approx(min(1.0, max(temp.hi, temp.value + (loo.hi - loo.value))))
    assert tw.hi - tw.lo >= min(1.0, loo.hi - loo.lo) - 1e-9 or tw.lo == 0.0 or tw.hi == 1.0
    assert estimate.wilson_floor(estimate.Estimate(0.3, 0.1, 0.9), estimate.Estimate(0.5, 0.45, 0.55)) == \
        estimate.Estimate(0.3, 0.1, 0.9)  # a wider interval stands
    calls = []
    monkeypatch.setattr(estimate, "fit_temperature", lambda *a: calls.append(1) or 1.0)
    out = estimate_all(probs[1], oof[1], ctx, ["temperature", "temperature_wilson", "blend"])
    assert len(calls) == 1 + 100  # one fit on all rows and the bootstrap's 100, for all three estimates
    assert out["temperature_wilson"]["estimate"] == out["temperature"]["estimate"]


def test_no_estimator_takes_truth():
    """The estimators' inputs: one prediction and the context (members, labeled rows); nothing else."""
    for name in ESTIMATORS.names():
        params = list(inspect.signature(ESTIMATORS.get(name)).parameters)
        assert params[:3] == ["test", "oof", "ctx"], name
        assert not {"truth", "labels", "target"} & set(params), name
    assert set(inspect.signature(EstimateContext).parameters) == {"probs", "oof", "y", "intervals", "_ds"}


def test_point_estimates_equal_the_values_with_intervals():
    truth, y, probs, oof = noisy_labelers([0.8, 0.6])
    full, point = EstimateContext(probs, oof, y), EstimateContext(probs, oof, y, intervals=False)
    for name in ESTIMATORS.names():
        e, p = ESTIMATORS.get(name)(probs[0], oof[0], full), ESTIMATORS.get(name)(probs[0], oof[0], point)
        assert p.value == pytest.approx(e.value), name


@pytest.mark.parametrize("script, args", [("05_heads.py", []), ("06_submit.py", []), ("cv.py", []),
                                          ("redraw.py", ["--draws", "2"])])
def test_an_unknown_estimator_exits_2_with_one_line_before_any_work(script, args, tmp_path, capsys):
    from conftest import run_script

    code, err = run_script(script, "cv.estimator=oracle", f"run.root={tmp_path}/runs", *args, capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == ["error: cv.estimator: unknown estimator 'oracle' (known: "
                                        + ", ".join(ESTIMATORS.names()) + ")"]
    assert not (tmp_path / "runs").exists()


def test_the_stages_that_print_estimates_check_the_estimator_name():
    from src.config import load_config
    from src.errors import UserError
    from src.stages import heads, submit

    cfg = load_config(None, ["cv.estimator=oracle"])
    for stage in (heads, submit):
        with pytest.raises(UserError, match="cv.estimator: unknown estimator 'oracle'"):
            stage.validate(cfg)
