"""Transductive inference (src/transductive, src/heads/transductive.py): each method against a
hand computation on a tiny case and, where installed (requirements-bench.txt), against easyfsl's
implementation; the balanced prior's marginals; leave-one-out of propagation never seeing the
held-out label (a spy on the solver); a smoke test over every registered head in both input modes."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import cg

from src.config import HeadsCfg, load_config
from src.errors import UserError
from src.heads import HEADS
from src.transductive import (LabelPropagation, Preprocess, TransductiveContext, block_cg, compute_prototypes,
                              info_objective, l2_normalize, propagation_operator, sinkhorn_balance, softmax)
from src.transductive import methods as M
from src.neighbors import knn_graph
from test_report import truth_comp  # noqa: F401  (fixture: digits copy with its truth file)

TRANSDUCTIVE = ["propagation", "pt_map", "tim", "laplacianshot", "bd_cspn"]


def blobs(rng, n_per_class, n_classes=4, dim=8, noise=0.6, means=None, shift=0.0):
    """Gaussian blobs around random class means (optionally all shifted): (x float32, y, means)."""
    means = rng.normal(size=(n_classes, dim)) if means is None else means
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (means[y] + shift + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y, means


def task(seed=0, n_shot=2, n_query=30, n_classes=4, dim=8, noise=0.6):
    rng = np.random.default_rng(seed)
    sx, sy, means = blobs(rng, n_shot, n_classes, dim, noise)
    qx, qy, _ = blobs(rng, n_query, n_classes, dim, noise, means)
    return sx, sy, qx, qy


# ---------------------------------------------------------------------------------------------
# shared numerics
# ---------------------------------------------------------------------------------------------
def test_prototypes_soft_assignments_and_preprocessing():
    x = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    soft = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    want = np.stack([(x[0] + 0.5 * x[1]) / 1.5, (0.5 * x[1] + x[2]) / 1.5])
    np.testing.assert_allclose(compute_prototypes(x, soft, 2, cosine=False), want, atol=1e-6)
    np.testing.assert_allclose(compute_prototypes(x, np.array([0, 0, 1]), 2), l2_normalize(np.array([[1, 1], [-1, 0]])),
                               atol=1e-6)
    from src.heads.transductive import FEATURES, features_for

    assert {n: features_for(HEADS.get(n)(HeadsCfg())) for n in TRANSDUCTIVE} == FEATURES  # auto: each its own
    assert {features_for(HEADS.get(n)(HeadsCfg(transductive_features="l2n"))) for n in TRANSDUCTIVE} == {"l2n"}
    rng = np.random.default_rng(0)
    raw = np.abs(rng.normal(size=(20, 5))).astype(np.float32)
    prep = Preprocess("power_cl2n", beta=0.5).fit(raw)
    z = l2_normalize(np.sqrt(raw))  # power transform, L2
    np.testing.assert_allclose(prep(raw), l2_normalize(z - z.mean(0)), atol=1e-5)  # centre on the fit rows, L2
    np.testing.assert_allclose(prep(raw[:3]), prep(raw)[:3], atol=1e-6)  # later rows reuse the fitted mean
    np.testing.assert_allclose(Preprocess("power", beta=0.5).fit(raw)(raw), np.sqrt(raw), atol=1e-6)  # no norm
    p = softmax(np.array([[1.0, 2.0, 3.0]]), np.array([True, False, True]))
    np.testing.assert_allclose(p, [[1 / (1 + np.e ** 2), 0, np.e ** 2 / (1 + np.e ** 2)]], atol=1e-6)


def test_block_cg_follows_scipy_cg_column_by_column():
    """Truncated CG is not linear in b; each column must follow scipy's iterates exactly."""
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(60, 6)))
    a = propagation_operator(*knn_graph(x, 5), alpha=0.95, gamma=3.0)
    b = np.zeros((60, 3))
    b[[0, 7, 9], [0, 1, 2]] = 1.0
    b[:, 2] = 0.0  # a zero right-hand side stays zero
    for maxiter in (3, 200):
        got = block_cg(a, b, x0=b, rtol=1e-6, maxiter=maxiter)
        for k in range(3):
            want, _ = cg(a, b[:, k], x0=b[:, k], rtol=1e-6, maxiter=maxiter)
            np.testing.assert_allclose(got[:, k], want, atol=1e-10)


def test_info_objective_gradients_match_autograd():
    """CE + cond * mean H(p_q) - marginal * H(mean p_q) (TIM's loss) against torch autograd."""
    rng = np.random.default_rng(2)
    zs, zq = rng.normal(size=(5, 4)), rng.normal(size=(9, 4)) * 2
    present = np.array([True, True, False, True])
    target = np.zeros((5, 4))
    target[np.arange(5), [0, 1, 3, 0, 1]] = 0.2
    loss, gs, gq = info_objective(zs, target, zq, present, cond_weight=0.3, marginal_weight=0.7, ce_weight=0.5)
    ts = torch.tensor(zs, requires_grad=True)
    tq = torch.tensor(zq, requires_grad=True)
    mask = torch.tensor(present)
    ls = torch.log_softmax(ts.masked_fill(~mask, -torch.inf), 1).masked_fill(~mask, 0)
    lq = torch.log_softmax(tq.masked_fill(~mask, -torch.inf), 1).masked_fill(~mask, 0)
    pq = lq.exp() * mask
    marg = pq.mean(0)
    ref = (0.5 * -(torch.tensor(target) * ls).sum() + 0.3 * -(pq * lq).sum(1).mean()
           - 0.7 * -(marg * torch.log(marg.clamp_min(1e-30))).sum())
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(gs[:, present], ts.grad.numpy()[:, present], atol=1e-8)
    np.testing.assert_allclose(gq[:, present], tq.grad.numpy()[:, present], atol=1e-8)


# ---------------------------------------------------------------------------------------------
# label propagation
# ---------------------------------------------------------------------------------------------
def test_propagation_seed_responses_equal_the_closed_form():
    """Cached per-seed solutions summed == (I - alpha S)^-1 Y with class-balanced seed mass, and the
    dense many-seed path gives the same answer."""
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(50, 6)))
    sims, idx = knn_graph(x, 6)
    lp = LabelPropagation(sims, idx, alpha=0.9, gamma=3.0)
    seeds, labels = np.array([3, 10, 11, 40]), np.array([0, 1, 1, 2])
    y = np.zeros((50, 3))
    y[seeds, labels] = [1.0, 0.5, 0.5, 1.0]  # class 1 has two seeds: each carries half its mass
    want = np.clip(np.linalg.solve(lp.a.toarray(), y), 0, None)
    np.testing.assert_allclose(lp.propagate(seeds, labels, 3), want, atol=1e-5)  # first call: direct solve
    np.testing.assert_allclose(lp.propagate(seeds, labels, 3), want, atol=1e-5)  # then: cached seed columns
    assert lp.responses(seeds).shape == (50, 4)
    y[3, 0] = 0.0  # seed 3 left out: its column is not used
    want = np.clip(np.linalg.solve(lp.a.toarray(), y), 0, None)
    np.testing.assert_allclose(lp.propagate(seeds[1:], labels[1:], 3), want, atol=1e-5)


def test_propagation_solves_each_recurring_seed_once_and_fresh_seeds_together(monkeypatch):
    """Seeds seen before (labeled rows under LOO / re-draws) are solved once each and cached; fresh
    seeds (an episode's pseudo-labeled support) share one C-column solve; mixed sets still equal the
    closed form (F is linear in Y)."""
    import src.transductive.graph as graph

    rng = np.random.default_rng(5)
    x = l2_normalize(rng.normal(size=(60, 6)))
    lp = LabelPropagation(*knn_graph(x, 6), alpha=0.9, gamma=3.0)
    solved = []
    real_cg = graph.block_cg
    monkeypatch.setattr(graph, "block_cg", lambda a, b, **kw: solved.append(b.shape[1]) or real_cg(a, b, **kw))

    def closed_form(seeds, labels):
        y = np.zeros((60, 3))
        np.add.at(y, (seeds, labels), 1.0 / np.bincount(labels, minlength=3)[labels])
        return np.clip(np.linalg.solve(lp.a.toarray(), y), 0, None)

    labeled, labeled_y = np.arange(9), np.arange(9) % 3
    np.testing.assert_allclose(lp.propagate(labeled, labeled_y, 3), closed_form(labeled, labeled_y), atol=1e-5)
    assert solved == [3]  # first sight: one solve of C columns
    for out in range(9):  # leave-one-out: each labeled row now recurs -> its own column, once
        keep = np.delete(labeled, out)
        np.testing.assert_allclose(lp.propagate(keep, labeled_y[keep], 3), closed_form(keep, labeled_y[keep]),
                                   atol=1e-5)
    assert sum(solved[1:]) == 9
    solved.clear()
    episode, episode_y = np.array([20, 21, 22, 23, 24, 25]), np.array([0, 0, 1, 1, 2, 2])
    mixed, mixed_y = np.concatenate([labeled[:3], episode]), np.concatenate([labeled_y[:3], episode_y])
    np.testing.assert_allclose(lp.propagate(mixed, mixed_y, 3), closed_form(mixed, mixed_y), atol=1e-5)
    assert solved == [3]  # six fresh seeds: one C-column solve, not six


def test_propagation_head_on_a_context_reuses_one_graph(monkeypatch):
    """All rows in one graph, built once for many fits; transductive_set=all needs no query rows."""
    sx, sy, qx, qy = task(seed=4)
    x = np.concatenate([sx, qx])
    calls = []
    import src.transductive.graph as graph

    real = graph.knn_graph
    monkeypatch.setattr(graph, "knn_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx = TransductiveContext(x)
    support = np.arange(len(sx))
    for drop in range(len(sx)):
        head = HEADS.get("propagation")(HeadsCfg(graph_k=8))
        head.context = ctx
        keep = support[support != drop]
        head.fit(keep, sy[keep], 4)
        assert head.predict_proba(np.arange(len(x))).shape == (len(x), 4)
    assert len(calls) == 1
    assert (head.predict_proba(np.arange(len(sx), len(x))).argmax(1) == qy).mean() > 0.9


def test_leave_one_out_of_propagation_never_sees_the_held_out_label(monkeypatch):
    """Stage 05's LOO with a context: a spy on the solver's seeds never finds the held-out row, and
    the held-out row's prediction does not change when its label does."""
    from src.config import Config
    from src.cv import leave_one_out
    from src.stages.heads import HeadInputs, fit_predict_fn

    sx, sy, qx, qy = task(seed=5, n_shot=3)
    x = l2_normalize(np.concatenate([sx, qx]))
    labeled, test = np.arange(len(sx)), np.arange(len(sx), len(x))
    cfg = Config()
    cfg.heads.graph_k = 8
    seen = []
    real = LabelPropagation.propagate

    def spy(self, seed_rows, seed_y, n_classes, seed_weight=None):
        seen.append(np.array(seed_rows))
        return real(self, seed_rows, seed_y, n_classes, seed_weight)

    monkeypatch.setattr(LabelPropagation, "propagate", spy)
    empty = np.zeros(0, np.int64)

    def loo(labels):
        h = HeadInputs(x=x, images=None, n_classes=4, labeled=labeled, labeled_y=labels, test=test, pseudo=empty,
                       pseudo_y=empty, pseudo_w=np.zeros(0, np.float32), pseudo_group=empty,
                       context=TransductiveContext(x))
        fp = fit_predict_fn("propagation", cfg, h, None, "cpu", False, labeled, labels,
                            np.ones(len(labeled), np.float32), np.arange(len(labeled)), test)
        return leave_one_out(fp, labels)

    oof = loo(sy)
    assert len(seen) == len(labeled)
    for i, seeds in enumerate(seen):
        assert i not in seeds and len(seeds) == len(labeled) - 1
    assert (oof.argmax(1) == sy).mean() >= 0.9
    for i in (0, 5):
        flipped = sy.copy()
        flipped[i] = (sy[i] + 1) % 4
        np.testing.assert_array_equal(loo(flipped)[i], oof[i])


# ---------------------------------------------------------------------------------------------
# PT-MAP, TIM, BD-CSPN, LaplacianShot: hand computations
# ---------------------------------------------------------------------------------------------
def test_pt_map_one_step_by_hand(monkeypatch):
    sx, sy, qx, _ = task(seed=6)
    fs, fq = l2_normalize(sx), l2_normalize(qx)
    centres = np.stack([fs[sy == c].mean(0) for c in range(4)])
    d2 = ((fq[:, None, :] - centres[None]) ** 2).sum(-1)
    p0, _ = M.pt_map(fs, sy, fq, 4, steps=0)
    np.testing.assert_allclose(p0.sum(0), len(fq) / 4, rtol=1e-3)  # the default tolerance
    plan = np.exp(-3.0 * d2)
    for _ in range(3000):  # Sinkhorn by hand: columns to Q / C, rows to 1, to convergence
        plan *= (len(fq) / 4) / plan.sum(0, keepdims=True)
        plan /= plan.sum(1, keepdims=True)
    monkeypatch.setattr(M, "SINKHORN_TOL", 1e-10)
    p0, c0 = M.pt_map(fs, sy, fq, 4, steps=0, lam=3.0)
    np.testing.assert_allclose(p0, plan, atol=1e-6)
    np.testing.assert_allclose(c0, centres, atol=1e-6)
    target = (np.eye(4)[sy].T @ fs + p0.T @ fq) / (np.bincount(sy) + p0.sum(0))[:, None]
    _, c1 = M.pt_map(fs, sy, fq, 4, steps=1, lr=0.3, lam=3.0)
    np.testing.assert_allclose(c1, centres + 0.3 * (target - centres), atol=1e-5)
    p_unbalanced, _ = M.pt_map(fs, sy, fq, 4, steps=0, balanced=False)
    np.testing.assert_allclose(p_unbalanced, np.exp(-10 * d2) / np.exp(-10 * d2).sum(1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("cosine", [False, True])
def test_tim_gradient_matches_autograd_of_the_paper_loss(cosine):
    """One TIM-GD step: our closed-form dL/dW equals torch autograd of
    0.1 CE - (1.0 H(Y) - 0.1 H(Y|X)) with logits -T/2 ||f - w||^2 (or T cos)."""
    sx, sy, qx, _ = task(seed=7)
    fs, fq = l2_normalize(sx), l2_normalize(qx)
    W = np.stack([fs[sy == c].mean(0) for c in range(4)]).astype(np.float64) + 0.05
    present = np.ones(4, bool)
    target = np.eye(4)[sy] / len(sy)
    _, g_s, g_q = info_objective(M.tim_logits(fs, W, 15.0, cosine), target, M.tim_logits(fq, W, 15.0, cosine),
                                 present, 0.1, 1.0, 0.1)
    grad = M.tim_weight_grad(W, fs, fq, g_s, g_q, 15.0, cosine)
    w = torch.tensor(W, requires_grad=True)

    def logits(f):
        f = torch.tensor(f, dtype=torch.float64)
        if cosine:
            return 15.0 * f @ torch.nn.functional.normalize(w, dim=1).T
        return -7.5 * ((f[:, None, :] - w[None]) ** 2).sum(-1)

    ps, pq = logits(fs).softmax(1), logits(fq).softmax(1)
    ce = -(torch.tensor(np.eye(4)[sy]) * torch.log(ps)).sum(1).mean()
    marg = pq.mean(0)
    loss = 0.1 * ce - (1.0 * -(marg * marg.log()).sum() - 0.1 * -(pq * pq.log()).sum(1).mean())
    loss.backward()
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_bd_cspn_rectification_by_hand():
    sx, sy, qx, _ = task(seed=8)
    fs, fq = l2_normalize(sx), l2_normalize(qx)
    protos = np.stack([fs[sy == c].mean(0) for c in range(4)])
    shifted = fq + fs.mean(0) - fq.mean(0)
    cos = lambda a, b: l2_normalize(a) @ l2_normalize(b).T  # noqa: E731
    label = cos(shifted, protos).argmax(1)
    want = []
    for c in range(4):
        rows = np.concatenate([fs[sy == c], shifted[label == c]])
        w = np.exp(5.0 * cos(rows, protos[c:c + 1])[:, 0])
        want.append((w[:, None] * rows).sum(0) / w.sum())
    np.testing.assert_allclose(M.rectify_prototypes(fs, sy, fq, 4, eps=5.0), np.stack(want), atol=1e-5)


def shared_direction_task(seed, n_query=100, n_classes=10, dim=64):
    """Features like pooled post-ReLU embeddings after L2N: one large direction shared by every row
    (mean pairwise cosine ~0.9), close class means, unequal class spreads, 3 shots, balanced queries.
    Returns (fs, ys, fq, yq), rows L2-normalised."""
    rng = np.random.default_rng(seed)
    means = 0.5 * rng.normal(size=(n_classes, dim))
    spread = rng.uniform(0.6, 1.6, n_classes)
    common = 3.0 * np.abs(rng.normal(size=dim))

    def draw(n):
        y = np.repeat(np.arange(n_classes), n)
        return l2_normalize(common + means[y] + spread[y, None] * rng.normal(size=(len(y), dim))), y

    return (*draw(3), *draw(n_query))


def test_bd_cspn_balanced_rectification_by_hand():
    """Under the balanced prior the pseudo-labels are the argmax of the Sinkhorn-balanced
    softmax(eps cos) of the cosines measured from the centre of the shifted queries, mean(fs); the
    weights keep the paper's plain cosine."""
    fs, sy, fq, _ = shared_direction_task(31)
    protos = np.stack([fs[sy == c].mean(0) for c in range(10)])
    shifted = fq + fs.mean(0) - fq.mean(0)
    centre = fs.mean(0, keepdims=True)
    cos = lambda a, b: l2_normalize(a) @ l2_normalize(b).T  # noqa: E731
    label = sinkhorn_balance(softmax(10.0 * cos(shifted - centre, protos - centre)), iters=1000, tol=1e-3).argmax(1)
    assert np.bincount(label, minlength=10).min() > 0.8 * len(fq) / 10  # the labels are balanced
    want = []
    for c in range(10):
        rows = np.concatenate([fs[sy == c], shifted[label == c]])
        w = np.exp(10.0 * cos(rows, protos[c:c + 1])[:, 0])
        want.append((w[:, None] * rows).sum(0) / w.sum())
    got = M.rectify_prototypes(fs, sy, fq, 10, eps=10.0, balanced=True)
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    xi = centre - fq.mean(0, keepdims=True)  # the cosines of fq + xi without forming it
    plain, centred = M.cosines(fq, protos, centre, shift=xi)
    np.testing.assert_allclose(plain, cos(shifted, protos), atol=1e-5)
    np.testing.assert_allclose(centred, cos(shifted - centre, protos - centre), atol=1e-5)
    np.testing.assert_allclose(M.centred_cosine(fq, protos), cos(fq, protos), atol=1e-5)


def test_laplacian_shot_reaches_the_bound_fixed_point():
    """Without neighbours the assignments are softmax(-a); with them the bound updates converge to
    y = softmax(-a + lambda W y) and never increase the bound."""
    sx, sy, qx, _ = task(seed=9)
    fq = l2_normalize(qx)
    protos = np.stack([l2_normalize(sx)[sy == c].mean(0) for c in range(4)])
    a = ((fq[:, None, :] - protos[None]) ** 2).sum(-1)
    present = np.ones(4, bool)
    none = sp.csr_matrix((len(fq), len(fq)))
    np.testing.assert_allclose(M.laplacian_shot(fq, protos, none, present), softmax(-a), atol=1e-6)
    kernel = M.knn_kernel(knn_graph(fq, 3)[1], len(fq))
    y = M.laplacian_shot(fq, protos, kernel, present, lam=0.7, steps=200)
    np.testing.assert_allclose(y, softmax(-a + 0.7 * (kernel @ y)), atol=1e-4)
    bounds, yk = [], softmax(-a).astype(np.float64)
    for _ in range(5):
        yk = softmax(-a + 0.7 * (kernel @ yk)).astype(np.float64)
        bounds.append(M.laplacian_bound(yk, a, kernel, 0.7))
    assert all(b1 <= b0 + 1e-9 for b0, b1 in zip(bounds, bounds[1:]))


# ---------------------------------------------------------------------------------------------
# against easyfsl (requirements-bench.txt)
# ---------------------------------------------------------------------------------------------
def _easyfsl(cls, sx, sy, **kw):
    model = cls(**kw)
    model.process_support_set(torch.tensor(sx), torch.tensor(sy))
    return model


def test_pt_map_matches_easyfsl(monkeypatch):
    easyfsl = pytest.importorskip("easyfsl.methods")
    sx, sy, qx, _ = task(seed=10, n_query=25)
    sx, qx = np.abs(sx), np.abs(qx)  # easyfsl's power transform assumes post-ReLU features
    theirs = _easyfsl(easyfsl.PTMAP, sx, sy, fine_tuning_steps=5, fine_tuning_lr=0.2, lambda_regularization=3.0,
                      power_factor=0.5)(torch.tensor(qx)).numpy()
    monkeypatch.setattr(M, "SINKHORN_TOL", 1e-9)  # easyfsl runs its Sinkhorn to 1e-6
    fs, fq = np.sqrt(sx + 1e-6), np.sqrt(qx + 1e-6)
    ours, _ = M.pt_map(fs, sy, fq, 4, steps=5, lr=0.2, lam=3.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_tim_matches_easyfsl():
    easyfsl = pytest.importorskip("easyfsl.methods")
    sx, sy, qx, _ = task(seed=11)
    fs, fq = l2_normalize(sx), l2_normalize(qx)
    theirs = _easyfsl(easyfsl.TIM, fs, sy, fine_tuning_steps=30, fine_tuning_lr=1e-2, temperature=10.0,
                      use_softmax=True)(torch.tensor(fq)).numpy()
    ours, _ = M.tim_gd(fs, sy, fq, 4, steps=30, lr=1e-2, temperature=10.0, ce_weight=1.0, marginal_weight=1.0,
                       cond_weight=0.1, cosine=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    untrained = softmax(10.0 * fq @ l2_normalize(np.stack([fs[sy == c].mean(0) for c in range(4)])).T)
    assert np.abs(ours - untrained).max() > 0.05  # the steps do move it


def test_bd_cspn_matches_easyfsl():
    easyfsl = pytest.importorskip("easyfsl.methods")
    sx, sy, qx, _ = task(seed=12)
    model = _easyfsl(easyfsl.BDCSPN, sx, sy)
    model(torch.tensor(qx))
    ours = M.rectify_prototypes(sx, sy, qx, 4, eps=1.0)
    np.testing.assert_allclose(l2_normalize(ours), l2_normalize(model.prototypes.numpy()), atol=1e-5)


def test_bd_cspn_head_matches_easyfsl_without_the_prior_and_beats_it_with_it():
    """Without the balanced prior and with easyfsl's exp(cos) weights (epsilon 1) the head predicts
    what easyfsl's BDCSPN predicts. With the prior (the default), on features sharing one large
    direction, it is more accurate than easyfsl's and its decisions are balanced: cosines measured
    from the centre, not the raw ones, whose softmax is too flat for Sinkhorn to balance decisions
    (there the balanced head's smallest class got 45 of 100 queries against 97 now)."""
    easyfsl = pytest.importorskip("easyfsl.methods")
    for seed in range(4):
        fs, sy, fq, qy = shared_direction_task(seed)
        model = _easyfsl(easyfsl.BDCSPN, fs, sy)
        theirs = model(torch.tensor(fq)).numpy().argmax(1)
        plain = HEADS.get("bd_cspn")(HeadsCfg(balanced_prior=False, bdcspn_epsilon=1.0))
        np.testing.assert_array_equal(plain.fit(fs, sy, 10, query_x=fq).predict_proba(fq).argmax(1), theirs)
        ours = HEADS.get("bd_cspn")(HeadsCfg()).fit(fs, sy, 10, query_x=fq).predict_proba(fq).argmax(1)
        counts = np.bincount(ours, minlength=10)
        assert counts.min() >= 90 and counts.max() <= 110, (seed, counts)
        assert (ours == qy).mean() >= (theirs == qy).mean() + 0.01, seed


def test_laplacian_shot_matches_easyfsl():
    easyfsl = pytest.importorskip("easyfsl.methods")
    sx, sy, qx, _ = task(seed=13)
    fs, fq = l2_normalize(sx), l2_normalize(qx)
    theirs = _easyfsl(easyfsl.LaplacianShot, fs, sy, inference_steps=20, knn=3,
                      lambda_regularization=0.7)(torch.tensor(fq)).numpy()
    protos = M.rectify_prototypes(fs, sy, fq, 4, eps=1.0)
    kernel = M.knn_kernel(knn_graph(fq, 2)[1], len(fq))  # easyfsl's knn=3 counts the row itself
    ours = M.laplacian_shot(fq, protos, kernel, np.ones(4, bool), lam=0.7, steps=20)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
def test_balanced_prior_equalises_the_class_marginals():
    """Queries 3:1:1:1 over the classes. With the prior every head's query posteriors carry Q / C per
    class; without it they do not (TIM keeps its own marginal-entropy prior: checked with weight 0)."""
    rng = np.random.default_rng(14)
    sx, sy, means = blobs(rng, 2)
    qx = np.concatenate([blobs(rng, n, 1, 8, 0.6, means[c:c + 1])[0] for c, n in enumerate([60, 20, 20, 20])])
    for name in TRANSDUCTIVE:
        for balanced in (True, False):
            cfg = HeadsCfg(balanced_prior=balanced, graph_k=8, tim_weights=[0.1, 1.0 if balanced else 0.0, 0.1])
            mass = HEADS.get(name)(cfg).fit(sx, sy, 4, query_x=qx).predict_proba(qx).sum(0)
            if balanced:
                np.testing.assert_allclose(mass, len(qx) / 4, rtol=2e-3, err_msg=name)
            else:
                assert np.abs(mass - len(qx) / 4).max() > 5, (name, mass)


@pytest.mark.parametrize("name", sorted(HEADS.names()))
def test_every_head_smoke(name):
    """Every registered head: (Q, C) float32 rows summing to 1 on rows it saw and on new rows, well
    above chance on blobs; heads with a context give the same kind of answer from row indices."""
    sx, sy, qx, qy = task(seed=15, n_shot=3)
    cfg = HeadsCfg(finetune_steps=20, graph_k=8, tim_steps=20)
    head = HEADS.get(name)(cfg).fit(sx, sy, 4, query_x=qx)
    for x in (qx, qx[:5] + 0.01):
        p = head.predict_proba(x)
        assert p.shape == (len(x), 4) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert (head.predict_proba(qx).argmax(1) == qy).mean() >= 0.8
    if HEADS.get(name).uses_context:
        ctx = TransductiveContext(np.concatenate([sx, qx]))
        for where in ("query", "all"):
            head = HEADS.get(name)(HeadsCfg(finetune_steps=20, graph_k=8, tim_steps=20, transductive_set=where))
            head.context = ctx
            rows = np.arange(len(sx), len(sx) + len(qx))
            p = head.fit(np.arange(len(sx)), sy, 4, query_x=rows).predict_proba(rows)
            assert p.shape == (len(qx), 4) and p.dtype == np.float32
            np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
            assert (p.argmax(1) == qy).mean() >= 0.8, where


def test_transductive_set_all_uses_unlabeled_rows_beyond_the_queries():
    """With a context and transductive_set=all, rows that are neither support nor query shape the
    answer (here: PT-MAP's centres), with query they do not."""
    sx, sy, qx, _ = task(seed=16)
    extra = qx[::-1] + 0.3
    ctx = TransductiveContext(np.concatenate([sx, qx, extra]))
    rows = np.arange(len(sx), len(sx) + len(qx))
    out = {}
    for where in ("query", "all"):
        # centred features: the extra rows move the centring mean as well as the centres
        head = HEADS.get("pt_map")(HeadsCfg(transductive_set=where, transductive_features="power_cl2n"))
        head.context = ctx
        out[where] = head.fit(np.arange(len(sx)), sy, 4, query_x=rows).predict_proba(rows)
    plain = HEADS.get("pt_map")(HeadsCfg(transductive_features="power_cl2n")).fit(sx, sy, 4, query_x=qx)
    assert np.abs(out["all"] - out["query"]).max() > 1e-3
    assert np.abs(plain.predict_proba(qx) - out["query"]).max() < 0.05  # same set, centring mean differs


def test_bench_transductive_table(truth_comp, tmp_path, capsys):
    """pipelines/bench.py transductive on a fake run: one table row per pair and set, accuracies
    from the truth file; our heads only (CI has no easyfsl)."""
    from conftest import run_script
    from test_report import make_run

    _, paths, overrides = make_run(truth_comp, tmp_path, pseudo=False)
    code, err = run_script("bench.py", "transductive", *overrides, "--no-reference", "--threads", "1",
                           "--methods", "propagation,pt_map,tim", capsys=capsys)
    assert code == 0, err
    table = (paths.run / "bench_transductive.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| test") or line.startswith("| all")]
    assert len(rows) == 6
    for row in rows:
        assert float(row.split("|")[3]) > 0.6, row
    code, err = run_script("bench.py", "transductive", *overrides, "--sets", "some", capsys=capsys)
    assert code == 2 and "--sets" in err
    code, err = run_script("bench.py", "transductive", *overrides, "--no-reference", "--threads", "1",
                           "--methods", "pt_map", "--sets", "test", "--draws", "2", capsys=capsys)
    assert code == 0, err
    table = (paths.run / "bench_transductive.md").read_text()
    assert "over 2 support re-draws" in table
    (row,) = [line for line in table.splitlines() if line.startswith("| test")]
    assert " ± " in row.split("|")[3] and float(row.split("|")[3].split("±")[0]) > 0.6
    code, err = run_script("bench.py", "transductive", *overrides, "--draws", "-1", capsys=capsys)
    assert code == 2 and "--draws" in err


def test_support_draws_come_from_truth_labeled_test_images():
    from src.transductive.bench import draw_cases

    test = np.arange(100, 160)
    truth = np.repeat([0, 1, 2, -1], 15)  # the last 15 test images have no known class
    cases = draw_cases(np.array([0, 0, 1, 1, 2, 2]), test, truth, 3, draws=3, seed=5)
    assert len(cases) == 3
    for case in cases:
        assert np.bincount(case.labeled_y, minlength=3).tolist() == [2, 2, 2]
        np.testing.assert_array_equal(case.labeled_y, truth[case.labeled - 100])  # labels are the truth
        assert not np.isin(case.labeled, case.test).any() and len(case.test) == 54
        np.testing.assert_array_equal(case.truth, truth[case.test - 100])
        assert np.isin(case.labeled - 100, np.flatnonzero(truth >= 0)).all()
    assert not np.array_equal(cases[0].labeled, cases[1].labeled)
    again = draw_cases(np.array([0, 0, 1, 1, 2, 2]), test, truth, 3, draws=1, seed=5)
    np.testing.assert_array_equal(again[0].labeled, cases[0].labeled)  # seeded: draw d is reproducible
    with pytest.raises(UserError, match="--draws"):
        draw_cases(np.array([0] * 20), test, truth, 3, draws=1)


@pytest.mark.parametrize("override, key", [
    ("heads.transductive_features=zca", "heads.transductive_features"),
    ("heads.transductive_set=some", "heads.transductive_set"),
    ("heads.graph_k=0", "heads.graph_k"),
    ("heads.propagation_alpha=1.0", "heads.propagation_alpha"),
    ("heads.ptmap_lr=0", "heads.ptmap_lr"),
    ("heads.tim_weights=[1.0,2.0]", "heads.tim_weights"),
    ("heads.power_beta=-1", "heads.power_beta"),
])
def test_bad_transductive_keys_name_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_sinkhorn_balance_warm_start_and_tolerance():
    rng = np.random.default_rng(17)
    resp = rng.dirichlet(np.ones(3) * 0.3, size=90) * np.array([5.0, 1.0, 1.0])
    resp /= resp.sum(1, keepdims=True)
    out = sinkhorn_balance(resp, iters=1000, tol=1e-6)
    np.testing.assert_allclose(out.sum(0), 30.0, rtol=1e-5)
    from src.transductive import sinkhorn

    _, scale = sinkhorn(resp, iters=1000, tol=1e-6)
    warm, _ = sinkhorn(resp, iters=1, scale=scale)  # converged scale: one step changes nothing
    np.testing.assert_allclose(warm, out, atol=1e-5)


@pytest.mark.parametrize("width", [1, 10, 17, 100])
def test_row_reductions_match_numpy(width):
    from src.transductive.core import row_max, row_sum

    z = np.random.default_rng(width).normal(size=(50, width)).astype(np.float32)
    np.testing.assert_array_equal(row_max(z), z.max(1, keepdims=True))
    np.testing.assert_allclose(row_sum(z), z.sum(1, keepdims=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(softmax(z).sum(1), 1.0, atol=1e-6)
