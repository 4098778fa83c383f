"""Few-shot heads on synthetic embeddings with known answers."""
import numpy as np
import pytest
import torch

from src.config import BackboneCfg, HeadsCfg
from src.heads import HEADS
from src.transductive import compute_prototypes, sinkhorn_balance


def blobs(rng, n_per_class, n_classes=5, dim=16, noise=0.9, means=None):
    """Gaussian blobs around random unit-scale class means: (x float32, y int)."""
    means = rng.normal(size=(n_classes, dim)) if means is None else means
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (means[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y, means


def on_circle(rng, y, offset_deg, noise_deg=3.0):
    """Unit vectors at 45 * class + offset degrees: classes 45 degrees apart."""
    a = np.deg2rad(45 * y + offset_deg + noise_deg * rng.normal(size=len(y)))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


@pytest.mark.parametrize("name, min_acc", [("protonet", 0.9), ("protonet_transductive", 0.9), ("knn", 0.85),
                                           ("cosine_finetune", 0.9), ("logreg", 0.9)])
def test_each_head_on_blobs(name, min_acc):
    rng = np.random.default_rng(0)
    sx, sy, means = blobs(rng, 5)
    qx, qy, _ = blobs(rng, 60, means=means)
    head = HEADS.get(name)(HeadsCfg(finetune_steps=30)).fit(sx, sy, 5, query_x=qx)
    probs = head.predict_proba(qx)
    assert probs.shape == (300, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == qy).mean() >= min_acc
    chance = HEADS.get(name)(HeadsCfg(finetune_steps=30)).fit(sx, rng.permutation(sy), 5, query_x=qx)
    assert (chance.predict_proba(qx).argmax(1) == qy).mean() < 0.6  # shuffled labels: no signal


def test_protonet_euclidean_matches_nearest_mean():
    rng = np.random.default_rng(1)
    sx, sy, means = blobs(rng, 3, noise=2.0)
    qx, _, _ = blobs(rng, 20, means=means, noise=2.0)
    probs = HEADS.get("protonet")(HeadsCfg(distance="euclidean")).fit(sx, sy, 5).predict_proba(qx)
    centers = np.stack([sx[sy == c].mean(0) for c in range(5)])
    want = ((qx[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(probs.argmax(1), want)
    # softmax of negative squared distances, exactly (Snell et al. 2017)
    d2 = ((qx[:, None, :] - centers[None]) ** 2).sum(-1)
    ref = np.exp(-(d2 - d2.min(1, keepdims=True)))
    np.testing.assert_allclose(probs, ref / ref.sum(1, keepdims=True), rtol=1e-3, atol=1e-5)


def test_absent_class_gets_zero_probability():
    rng = np.random.default_rng(2)
    sx, sy, means = blobs(rng, 3)
    keep = sy != 2
    for name in HEADS.names():
        probs = HEADS.get(name)(HeadsCfg(finetune_steps=3)).fit(sx[keep], sy[keep], 5, query_x=sx).predict_proba(sx)
        assert probs.shape == (15, 5) and np.all(probs[:, 2] == 0), name
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_cosine_classifier_init_equals_cosine_protonet():
    """W = M (normalised class means), b = 0: identical predictions before any training step."""
    rng = np.random.default_rng(3)
    sx, sy, means = blobs(rng, 2, noise=1.5)
    qx, _, _ = blobs(rng, 40, means=means, noise=1.5)
    cfg = HeadsCfg(finetune_steps=0, finetune_temperature=7.0, protonet_temperature=7.0, distance="cosine")
    ft = HEADS.get("cosine_finetune")(cfg).fit(sx, sy, 5, query_x=qx).predict_proba(qx)
    pn = HEADS.get("protonet")(cfg).fit(sx, sy, 5).predict_proba(qx)
    np.testing.assert_allclose(ft, pn, atol=1e-5)
    np.testing.assert_array_equal(ft.argmax(1), pn.argmax(1))
    trained = HEADS.get("cosine_finetune")(HeadsCfg(finetune_steps=30, finetune_temperature=7.0))
    trained = trained.fit(sx, sy, 5, query_x=qx).predict_proba(qx)
    assert np.abs(trained - pn).max() > 1e-3  # and training does move it


def test_entropy_regularisation_sharpens_query_predictions():
    rng = np.random.default_rng(4)
    sx, sy, means = blobs(rng, 2, noise=1.5)
    qx, _, _ = blobs(rng, 40, means=means, noise=1.5)

    def query_entropy(weight):
        cfg = HeadsCfg(finetune_steps=40, finetune_entropy_weight=weight)
        p = HEADS.get("cosine_finetune")(cfg).fit(sx, sy, 5, query_x=qx).predict_proba(qx)
        return float(-(p * np.log(p + 1e-12)).sum(1).mean())

    assert query_entropy(1.0) < query_entropy(0.0) - 0.05


def test_transductive_refinement_fixes_shifted_queries():
    """Queries rotated 30 degrees from their support (classes 45 degrees apart): the nearest prototype
    is the wrong class for 3 of 4 classes; soft k-means over the queries follows them."""
    rng = np.random.default_rng(0)
    sy, qy = np.repeat(np.arange(4), 2), np.repeat(np.arange(4), 100)
    sx, qx = on_circle(rng, sy, 0), on_circle(rng, qy, 30)
    plain = HEADS.get("protonet")(HeadsCfg()).fit(sx, sy, 4).predict_proba(qx)
    for balanced in (True, False):
        refined = HEADS.get("protonet_transductive")(HeadsCfg(balanced_prior=balanced))
        refined = refined.fit(sx, sy, 4, query_x=qx).predict_proba(qx)
        assert (plain.argmax(1) == qy).mean() < 0.35 and (refined.argmax(1) == qy).mean() > 0.95
    no_query = HEADS.get("protonet_transductive")(HeadsCfg()).fit(sx, sy, 4).predict_proba(qx)
    np.testing.assert_allclose(no_query, plain, atol=1e-6)  # without queries it is ProtoNet


def test_sinkhorn_balance_equalises_class_mass():
    rng = np.random.default_rng(5)
    resp = rng.dirichlet(np.ones(3) * 0.3, size=60) * np.array([5.0, 1.0, 1.0])
    resp /= resp.sum(1, keepdims=True)
    out = sinkhorn_balance(resp, np.ones(3, bool), iters=100)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(out.sum(0), 20.0, atol=1e-3)


def test_knn_distance_weighted_vote_and_self_match():
    # Query at angle 0: one class-1 neighbour at 2 degrees, two class-0 neighbours at 40 degrees
    # (k=3); a second class-1 row at 180 degrees is not a neighbour but makes both classes 2 rows.
    ang = np.deg2rad([2.0, 40.0, -40.0, 180.0])
    sx = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    sy = np.array([1, 0, 0, 1])
    q = np.array([[1.0, 0.0]], np.float32)
    probs = HEADS.get("knn")(HeadsCfg(knn_k=3, knn_temperature=0.07)).fit(sx, sy, 2).predict_proba(q)
    w_near, w_far = np.exp((np.cos(ang[0]) - 1) / 0.07), np.exp((np.cos(ang[1]) - 1) / 0.07)
    assert probs.argmax() == 1 and probs[0, 1] == pytest.approx(w_near / (w_near + 2 * w_far), abs=1e-3)
    flat = HEADS.get("knn")(HeadsCfg(knn_k=3, knn_temperature=100.0)).fit(sx, sy, 2).predict_proba(q)
    assert flat.argmax() == 0  # (almost) unweighted: majority of the 3 wins
    # A pseudo-labeled row identical to the query (weight < 1) does not vote for itself.
    sx2, sy2 = np.vstack([sx, q]), np.array([1, 0, 0, 1, 0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.9], np.float32)
    probs = HEADS.get("knn")(HeadsCfg(knn_k=3)).fit(sx2, sy2, 2, support_weight=w).predict_proba(q)
    far = sx2.copy()
    far[-1] = [-1.0, 0.0]  # the same row moved out of the neighbourhood: same class mass, no vote
    want = HEADS.get("knn")(HeadsCfg(knn_k=3)).fit(far, sy2, 2, support_weight=w).predict_proba(q)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    assert not np.allclose(want, HEADS.get("knn")(HeadsCfg(knn_k=3)).fit(sx2, sy2, 2).predict_proba(q))


def test_support_weights_move_prototypes():
    x = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 0, 1])
    protos = compute_prototypes(x, y, 2, weight=np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(protos[0], [1, 0], atol=1e-6)


@pytest.fixture
def one_thread():
    """16x16 images through a width-4 net: intra-op threads only contend on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cosine_finetune_with_encoder_flip_tta(one_thread):
    """Encoder mode: images in, a copy of the encoder is fine-tuned (the original is untouched), and
    flip TTA makes predictions exactly mirror-invariant."""
    from src.models.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(BackboneCfg(name="resnet18", width=4))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 2)
    head = HEADS.get("cosine_finetune")(HeadsCfg(finetune_steps=2, finetune_encoder_lr=1e-2, tta_flip=True,
                                                 finetune_query_batch=4),
                                        encoder=enc)
    head.fit(images[:6], y, 3, query_x=images[6:])
    probs = head.predict_proba(images)
    mirrored = head.predict_proba(images[:, :, ::-1].copy())
    assert probs.shape == (12, 3)
    np.testing.assert_allclose(probs, mirrored, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in head.encoder.state_dict().items())


def test_cosine_softmax_grads_match_torch_autograd():
    """The closed-form gradients of CE + entropy through the row-normalised W equal autograd's."""
    from src.heads.cosine_finetune import cosine_softmax_grads

    rng = np.random.default_rng(6)
    C, D = 4, 6
    W, b = rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32)
    xs = rng.normal(size=(7, D)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    xq = rng.normal(size=(9, D)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    y = np.array([0, 1, 1, 3, 0, 3, 1])  # class 2 absent: masked
    wts = rng.uniform(0.5, 1.0, 7).astype(np.float32)
    target = np.zeros((7, C), np.float32)
    target[np.arange(7), y] = wts / wts.sum()
    present = np.array([True, True, False, True])
    loss, gw, gb = cosine_softmax_grads(W, b, xs, target, xq, 5.0, 0.3, present)

    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(present)

    def logits(x):
        z = 5.0 * torch.tensor(x, dtype=torch.float64) @ torch.nn.functional.normalize(Wt, dim=1).T + bt
        return z.masked_fill(~mask, -torch.inf)

    logp = torch.log_softmax(logits(xs), 1)
    ce = -(torch.tensor(target, dtype=torch.float64) * logp.masked_fill(~mask, 0)).sum()
    lq = torch.log_softmax(logits(xq), 1)
    ent = -(lq.exp() * lq.masked_fill(~mask, 0)).sum(1).mean()
    ref = ce + 0.3 * ent
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-4)
    np.testing.assert_allclose(gw, Wt.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(gb[present], bt.grad.numpy()[present], atol=1e-5)


@pytest.mark.parametrize("name", ["protonet", "knn", "logreg"])
def test_one_image_short_class_is_not_voted_against(name):
    """Leave-one-out leaves the held-out image's class one image short. With features that carry no
    class signal at all (every support image identical) only a class prior can decide, and it must
    be the balanced one: probability 1/C for every class. A prior learned from the support counts
    (2 vs 3 images) would vote against the held-out class and drive LOO accuracy below chance."""
    rng = np.random.default_rng(7)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    x = np.tile(rng.normal(size=(1, 8)).astype(np.float32), (len(y), 1))
    q = rng.normal(size=(50, 8)).astype(np.float32)
    probs = HEADS.get(name)(HeadsCfg(finetune_steps=20, knn_k=11)).fit(x, y, 4, query_x=q).predict_proba(q)
    np.testing.assert_allclose(probs, 0.25, atol=0.01)


def test_cosine_finetune_loss_has_no_count_prior():
    """The cosine classifier's CE is class-balanced: at a point where every class looks the same
    (identical W rows), its gradient on the bias b is zero even though class 0 has fewer images;
    plain count-weighted CE would push b_0 down (the gradient is positive)."""
    from src.heads.cosine_finetune import class_balanced_targets, cosine_softmax_grads

    rng = np.random.default_rng(8)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    xs = rng.normal(size=(len(y), 8))
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    W, b = np.tile(rng.normal(size=(1, 8)), (4, 1)), np.zeros(4)
    present = np.ones(4, bool)
    target = class_balanced_targets(y, np.ones(len(y)), 4)
    np.testing.assert_allclose(target.sum(0), 0.25)
    _, _, gb = cosine_softmax_grads(W, b, xs, target, xs[:0], 10.0, 0.0, present)
    np.testing.assert_allclose(gb, 0.0, atol=1e-12)
    counts = np.eye(4)[y] / len(y)
    _, _, gb_counts = cosine_softmax_grads(W, b, xs, counts, xs[:0], 10.0, 0.0, present)
    assert gb_counts[0] > 0.05 and np.all(gb_counts[1:] < 0)
