"""Meta-learning methods: MAML/FO-MAML/Reptile math against hand computations, the episodic
sampler's episodes and errors, Relation and Siamese networks on Gaussian blobs, and the 04_meta
stage end to end on a tiny digits competition."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src import io
from src.config import BackboneCfg, MetaCfg, load_config
from src.data import CompetitionData
from src.errors import UserError
from src.meta import META_METHODS
from src.meta.base import FeatureBank, Identity, Task, meta_train
from src.meta.maml import MAML, SupportBatchNorm, inner_adapt, use_support_batchnorm
from src.meta.sampler import EpisodeSampler, Pool, cluster_pool, pseudo_pool
from tests.conftest import run_script




def linear_logits(params, x):
    return F.linear(x, params["head.weight"], params["head.bias"])


def tiny_task(seed=0, n_way=3, d=4, k=2, q=3):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n_way * k, d, generator=g), torch.randn(n_way * q, d, generator=g)
    return Task(xs, torch.arange(n_way).repeat_interleave(k), xq, torch.arange(n_way).repeat_interleave(q), n_way)


def blobs(n_classes=30, per_class=20, d=8, spread=0.15, seed=0, noise_dims=0):
    """Gaussian blobs (class centres N(0, I_d)); noise_dims extra N(0, 1.5^2) dimensions carry no class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, d))
    x = (centers[:, None] + spread * rng.normal(size=(n_classes, per_class, d))).reshape(-1, d)
    x = np.concatenate([x, 1.5 * rng.normal(size=(len(x), noise_dims))], axis=1)
    return x.astype(np.float32), np.repeat(np.arange(n_classes), per_class)


class LinearBody(nn.Module):
    """A tiny trainable body: relu(Linear(x)), with the .dim the methods read."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc, self.dim = nn.Linear(d_in, d_out), d_out

    def forward(self, x):
        return torch.relu(self.fc(x))


# ---------------------------------------------------------------------------------------------
# MAML family
# ---------------------------------------------------------------------------------------------
def test_maml_inner_steps_match_hand_computed_gradient_steps():
    method = MAML(MetaCfg(inner_lr=0.3, temperature=10.0), Identity(4))
    t = tiny_task()
    fast = method.adapt(t.xs, t.ys, 3, steps=2, create_graph=False)
    # by hand, from the zero head: dCE/dW = (softmax(XW^T + b) - Y)^T X / n, dCE/db = mean(softmax - Y)
    x, y = t.xs.numpy().astype(np.float64), np.eye(3)[t.ys.numpy()]
    x = 10.0 * x / np.linalg.norm(x, axis=1, keepdims=True)  # head input: meta.temperature * h / |h|
    w, b = np.zeros((3, 4)), np.zeros(3)
    for _ in range(2):
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w, b = w - 0.3 * (p - y).T @ x / len(x), b - 0.3 * (p - y).mean(0)
    np.testing.assert_allclose(fast["head.weight"].detach().numpy(), w, atol=1e-6)
    np.testing.assert_allclose(fast["head.bias"].detach().numpy(), b, atol=1e-6)


def _meta_grads(theta, task, steps, lr, create_graph):
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    fast = inner_adapt(linear_logits, params, task.xs, task.ys, steps, lr, create_graph)
    loss = F.cross_entropy(linear_logits(fast, task.xq), task.yq)
    return torch.autograd.grad(loss, list(params.values())), fast


def test_second_order_meta_gradient_matches_reference_and_differs_from_first_order():
    torch.manual_seed(0)
    task, lr = tiny_task(), 0.5
    theta = {"head.weight": torch.randn(3, 4, dtype=torch.float64), "head.bias": torch.randn(3, dtype=torch.float64)}
    task = Task(task.xs.double(), task.ys, task.xq.double(), task.yq, 3)
    second, fast = _meta_grads(theta, task, 1, lr, create_graph=True)
    first, _ = _meta_grads(theta, task, 1, lr, create_graph=False)
    # reference: d L_q(theta - lr * grad L_s(theta)) / d theta = (I - lr * H_s) grad L_q(theta')
    flat = torch.cat([v.reshape(-1) for v in theta.values()])

    def support_loss(v):
        return F.cross_entropy(F.linear(task.xs, v[:12].view(3, 4), v[12:]), task.ys)

    hessian = torch.autograd.functional.hessian(support_loss, flat)
    fast_flat = torch.cat([v.detach().reshape(-1) for v in fast.values()]).requires_grad_()
    g_query = torch.autograd.grad(F.cross_entropy(F.linear(task.xq, fast_flat[:12].view(3, 4), fast_flat[12:]),
                                                  task.yq), fast_flat)[0]
    reference = (torch.eye(len(flat), dtype=torch.float64) - lr * hessian) @ g_query
    got_second = torch.cat([g.reshape(-1) for g in second])
    got_first = torch.cat([g.reshape(-1) for g in first])
    torch.testing.assert_close(got_second, reference, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got_first, g_query, atol=1e-10, rtol=1e-8)  # FO-MAML: query gradient at theta'
    assert (got_second - got_first).abs().max() > 1e-3  # the Hessian term matters here
    # no inner step: both are the plain query gradient
    s0, _ = _meta_grads(theta, task, 0, lr, create_graph=True)
    f0, _ = _meta_grads(theta, task, 0, lr, create_graph=False)
    for a, b in zip(s0, f0):
        torch.testing.assert_close(a, b)


def test_maml_follows_first_order_switch_and_fomaml_is_first_order():
    t = tiny_task(seed=3)

    def body_grad(name, first_order):
        torch.manual_seed(0)
        method = META_METHODS.get(name)(MetaCfg(inner_steps=2, inner_lr=0.5, first_order=first_order),
                                        LinearBody(4, 5))
        method.setup()
        method.query_loss(t, create_graph=not method.is_first_order).backward()
        return method.body.fc.weight.grad.clone()

    second, first = body_grad("maml", False), body_grad("maml", True)
    assert (second - first).abs().max() > 1e-4
    torch.testing.assert_close(body_grad("fomaml", False), first)  # ignores meta.first_order=false


def test_reptile_moves_initialisation_toward_adapted_weights_by_epsilon():
    torch.manual_seed(0)
    cfg = MetaCfg(inner_steps=3, inner_lr=0.2, reptile_epsilon=0.5, episodes=10)
    method = META_METHODS.get("reptile")(cfg, LinearBody(4, 6))
    method.setup()
    tasks = [tiny_task(seed=1), tiny_task(seed=2)]
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    adapted = []
    for t in tasks:  # by hand: inner SGD on all of the task's images, from the initialisation
        start = {k: v.detach().clone().requires_grad_() for k, v in method.init_params(3).items()}
        x, y = torch.cat([t.xs, t.xq]), torch.cat([t.ys, t.yq])
        adapted.append(inner_adapt(method.logits, start, x, y, 3, 0.2, False))
    method.step(tasks, iteration=0)  # epsilon = 0.5 at iteration 0
    for name in ("body.fc.weight", "body.fc.bias"):
        key = name[len("body."):]
        target = torch.stack([a[key].detach() for a in adapted]).mean(0)
        expect = before[name] + 0.5 * (target - before[name])
        torch.testing.assert_close(dict(method.named_parameters())[name].detach(), expect)
        assert (target - before[name]).abs().max() > 1e-4  # it did move
    assert method.epsilons[5] == pytest.approx(0.25)  # linear decay to 0


def test_support_batchnorm_normalises_queries_with_support_statistics():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(2.0), bn.bias.fill_(0.5)
    holder = nn.Sequential(bn)
    assert use_support_batchnorm(holder) == 1 and isinstance(holder[0], SupportBatchNorm)
    x = torch.randn(6, 3, 2, 2)
    holder[0].n_ref = 4
    out = holder(x)
    ref = x[:4]
    mean, var = ref.mean((0, 2, 3), keepdim=True), ref.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + 1e-5) * 2.0 + 0.5)
    # a query's output does not depend on the other queries in its batch
    holder[0].n_ref = 4
    alone = holder(torch.cat([x[:4], x[4:5]]))[4]
    torch.testing.assert_close(alone, out[4])


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
def test_sampler_episode_shapes_and_disjoint_support_query():
    labels = np.repeat(np.arange(6), 5)
    pool = Pool(np.arange(100, 130), labels, "labeled")
    sampler = EpisodeSampler(pool, n_way=4, n_shot=2, n_query=3)
    for seed in range(5):
        ep = sampler.sample(np.random.default_rng(seed))
        assert ep.support_rows.shape == (8,) and ep.query_rows.shape == (12,)
        assert len(set(ep.support_rows) | set(ep.query_rows)) == 20  # no image twice
        np.testing.assert_array_equal(ep.support_y, np.repeat(np.arange(4), 2))
        for rows, ys in ((ep.support_rows, ep.support_y), (ep.query_rows, ep.query_y)):
            np.testing.assert_array_equal(labels[rows - 100], ep.classes[ys])  # labels match the pool


def test_sampler_errors_name_class_and_counts():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 2)
    pool = Pool(np.arange(12), labels, "pseudo")
    with pytest.raises(UserError, match=r"n_query = 4 .* class 2 has only 2 image\(s\) \(1 of 3 classes"):
        EpisodeSampler(pool, n_way=2, n_shot=1, n_query=3)
    with pytest.raises(UserError, match=r"n_way = 4, but the pseudo pool has only 3 class\(es\)"):
        EpisodeSampler(pool, n_way=4, n_shot=1, n_query=1)


def test_cluster_pool_episodes_stay_within_one_clustering():
    x, _ = blobs(n_classes=8, per_class=15, d=6)
    pool = cluster_pool(x, np.arange(len(x)), n_clusters=8, n_way=3, min_size=3, clusterings=2, seed=0)
    assert set(np.unique(pool.groups)) == {0, 1}
    sampler = EpisodeSampler(pool, 3, 1, 2)
    for seed in range(10):
        ep = sampler.sample(np.random.default_rng(seed))
        assert len({int(c) // 8 for c in ep.classes}) == 1  # class ids p*8+k: all from one clustering


def test_pseudo_pool_selection_and_labeled_rows(tmp_path):
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)],
                          "split": ["train", "train", "val", "train", "train", "train", "test", "test"],
                          "label": [3, 7, 3, -1, -1, -1, -1, -1]})
    data = CompetitionData(images=np.zeros((8, 32, 32, 3), np.uint8), index=index)
    table = pd.DataFrame({"image_id": ["i3", "i4", "i5", "i6", "i0"], "label": [7, 3, 7, 3, 7],
                          "confidence": [0.95, 0.5, 0.2, 0.99, 1.0], "source": "x",
                          "selected": [False, True, False, False, True]})
    path = tmp_path / "labels.csv"
    table.to_csv(path, index=False)
    pool = pseudo_pool(data, path, threshold=0.9, include_labeled=False)
    assert pool.rows.tolist() == [3, 4, 6]  # confident or selected; labeled i0 never relabeled
    assert pool.labels.tolist() == [1, 0, 0]  # class ids of labels 7, 3, 3
    both = pseudo_pool(data, path, threshold=0.9, include_labeled=True)
    assert both.rows.tolist() == [0, 1, 2, 3, 4, 6] and both.labels.tolist() == [0, 1, 0, 1, 0, 0]


# ---------------------------------------------------------------------------------------------
# Relation and Siamese networks on blobs (new classes at test time)
# ---------------------------------------------------------------------------------------------
def _train_on_blobs(name, episodes, noise_dims=0):
    torch.manual_seed(0)
    x, y = blobs(noise_dims=noise_dims)
    bank = FeatureBank(np.arange(len(y)), torch.from_numpy(x), len(y))
    cfg = MetaCfg(n_way=5, n_shot=1, n_query=5, episodes=episodes, meta_batch=2, outer_lr=1e-2, hidden=32)
    method = META_METHODS.get(name)(cfg, LinearBody(x.shape[1], 16))
    method.setup()
    train = y < 20
    meta_train(method, EpisodeSampler(Pool(np.flatnonzero(train), y[train], "labeled"), 5, 1, 5), bank, seed=0)
    return method, bank, x, y


def _episode_accuracy(method, bank, y):
    test = EpisodeSampler(Pool(np.flatnonzero(y >= 20), y[y >= 20], "labeled"), 5, 1, 5)
    accs = []
    for seed in range(30):
        ep = test.sample(np.random.default_rng(1000 + seed))
        probs = method.predict(bank[ep.support_rows], torch.as_tensor(ep.support_y), bank[ep.query_rows], 5)
        assert probs.shape == (25, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
        accs.append((probs.argmax(1) == ep.query_y).mean())
    return float(np.mean(accs))


def test_relation_network_beats_chance_on_unseen_blob_classes():
    method, bank, _, y = _train_on_blobs("relation", episodes=0)
    untrained = _episode_accuracy(method, bank, y)
    method, bank, _, y = _train_on_blobs("relation", episodes=80)
    trained = _episode_accuracy(method, bank, y)
    assert untrained < 0.4  # a random relation module sits at chance (0.2) ...
    assert trained > 0.8  # ... the trained one does not


def _pair_accuracy(method, bank, y):
    """Accuracy of p(same) > 0.5 on 400 same-class pairs and 400 random pairs of unseen classes."""
    rng = np.random.default_rng(5)
    test = np.flatnonzero(y >= 20)
    a, b = rng.choice(test, 400), rng.choice(test, 400)
    mate = np.array([rng.choice(test[(y[test] == y[i]) & (test != i)]) for i in a])
    left, right = np.concatenate([a, a]), np.concatenate([mate, b])
    method.eval()
    with torch.no_grad():
        logits = method.pair_logits(method.features(bank[left]), method.features(bank[right])).diagonal()
    return float(((torch.sigmoid(logits).numpy() > 0.5) == (y[left] == y[right])).mean())


def test_siamese_pair_head_separates_same_and_different_pairs():
    # 8 loud noise dimensions: the initial plain L1 distance is fooled, the learned pair head is not
    method, bank, _, y = _train_on_blobs("siamese", episodes=0, noise_dims=8)
    untrained = _pair_accuracy(method, bank, y)
    method, bank, _, y = _train_on_blobs("siamese", episodes=60, noise_dims=8)
    trained = _pair_accuracy(method, bank, y)
    assert untrained < 0.7 and trained > 0.95


# ---------------------------------------------------------------------------------------------
# Encoder split
# ---------------------------------------------------------------------------------------------
def test_encoder_tail_on_cached_trunk_features_reproduces_the_encoder():
    from src.meta.base import EncoderTail, trunk_features
    from src.models.encoder import Encoder, to_input

    torch.manual_seed(0)
    encoder = Encoder(BackboneCfg(name="resnet18", width=4), 32).eval()
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    rows = np.array([5, 0, 3])
    feats = trunk_features(encoder, images, rows, torch.device("cpu"), precision="fp32")
    assert feats.shape == (3, 32, 4, 4) and feats.dtype == torch.float16  # input of layer4[-1], in row order
    tail = EncoderTail(encoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(tail(feats.float()), encoder(to_input(torch.from_numpy(images[rows]))),
                                   atol=2e-3, rtol=1e-2)  # float16 cache
    trainable = {n for n, p in tail.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.layer4.1.") for n in trainable)  # only the last block


def test_trunk_cache_gives_trunk_features_and_computes_each_row_once(monkeypatch):
    import src.meta.base as base
    from src.models.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder(BackboneCfg(name="resnet18", width=4), 32).eval()
    images = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    asked, real = [], base.trunk_features
    monkeypatch.setattr(base, "trunk_features", lambda enc, imgs, rows, *a, **k: asked.append(rows.tolist())
                        or real(enc, imgs, rows, *a, **k))
    cache = base.TrunkCache(encoder, images, torch.device("cpu"), batch_size=4, precision="fp32")
    for rows in ([5, 0, 3], [3, 8, 5, 1, 1], [0, 3]):  # repeats, overlaps, a call with nothing new
        rows = np.array(rows)
        got = cache(rows)
        assert got.dtype == torch.float16 and got.shape == (len(rows), 32, 4, 4)
        torch.testing.assert_close(got, real(encoder, images, rows, torch.device("cpu"), precision="fp32"),
                                   atol=1e-3, rtol=1e-3)  # batch composition may move a float16 rounding
    assert asked == [[0, 3, 5], [1, 8]]  # only rows not computed before, each once


# ---------------------------------------------------------------------------------------------
# Leave-one-out without leakage
# ---------------------------------------------------------------------------------------------
def test_labeled_pool_leave_one_out_never_meta_trains_on_the_held_out_image(monkeypatch):
    import src.stages.meta as stage

    x, y = blobs(n_classes=4, per_class=3, d=6, seed=1)  # 12 "labeled" images, 3 per class
    test_x, test_y = blobs(n_classes=4, per_class=5, d=6, seed=1)
    feats = torch.from_numpy(np.concatenate([x, test_x]))
    labeled, test = np.arange(12), np.arange(12, 32)
    cfg = load_config(None, ["run.device=cpu", "meta.episodes=2", "meta.meta_batch=1", "meta.n_way=2",
                             "meta.n_shot=1", "meta.n_query=1", "meta.methods=[protonet_episodic]"])
    pool = Pool(labeled, y, "labeled")
    inp = stage.MetaInputs(cfg, "ssl", torch.device("cpu"), None, 6, pool, stage.make_sampler(cfg, pool),
                           FeatureBank(np.arange(32), feats, 32), labeled, y, test, 4, test_y)
    seen = []
    real = stage.meta_train

    def spy(method, sampler, *args, **kwargs):
        seen.append(set(sampler.pool.rows.tolist()))
        return real(method, sampler, *args, **kwargs)

    monkeypatch.setattr(stage, "meta_train", spy)
    record, probs, oof = stage.run_method("protonet_episodic", inp)
    assert seen[0] == set(range(12))  # the test-time model: every labeled image
    assert seen[1:] == [set(range(12)) - {i} for i in range(12)]  # fold i: all but image i
    assert oof.shape == (12, 4) and probs.shape == (20, 4)
    assert record["loo"]["accuracy"] > 0.9 and record["test_accuracy"] > 0.9  # separable blobs


# ---------------------------------------------------------------------------------------------
# Stage end to end (tiny digits, random narrow encoder standing in for 01_ssl)
# ---------------------------------------------------------------------------------------------
def _fake_ssl(cfg):
    from src.data import load_data
    from src.models.encoder import Encoder, embed, save_encoder
    from src.paths import RunPaths
    from src.stages import get_stage, run_stage

    run_stage(get_stage("prepare"), cfg)
    paths = RunPaths(cfg)
    torch.manual_seed(0)
    encoder = Encoder(BackboneCfg(name="resnet18", width=4), 32)
    save_encoder(encoder, paths.encoder("ssl"), paths.encoder_spec("ssl"))
    io.write_npy(paths.embeddings("ssl"), embed(encoder, load_data(paths).images, torch.device("cpu")).astype(np.float16))
    io.write_json(paths.done_marker("ssl"), {"fingerprint": "test", "summary": {}})
    return paths


def test_meta_stage_end_to_end_on_digits(comp, tmp_path, capsys):
    from src.stages import get_stage, run_stage

    overrides = [f"data.path={comp}", "data.truth=", f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu",
                 "run.progress=false", "meta.methods=[siamese, relation, fomaml]", "meta.pool=auto",
                 "meta.clusters=12", "meta.episodes=3", "meta.meta_batch=1", "meta.n_way=3", "meta.n_query=2",
                 "meta.inner_steps=1", "meta.test_inner_steps=2", "meta.checkpoint_every=2"]
    cfg = load_config(None, overrides)
    paths = _fake_ssl(cfg)
    summary = run_stage(get_stage("meta"), cfg)
    assert summary["pool"] == "clusters" and set(summary["methods"]) == {"siamese", "relation", "fomaml"}
    n_test = len(pd.read_csv(comp / "sample_submission.csv"))
    for name in ("siamese", "relation", "fomaml"):
        probs, oof = io.read_npy(paths.head_probs(name, "meta")), io.read_npy(paths.head_oof(name, "meta"))
        assert probs.shape == (n_test, 10) and oof.shape == (30, 10)
        assert probs.dtype == np.float32 and np.allclose(oof.sum(1), 1, atol=1e-4)
        record = summary["methods"][name]
        lo, hi = record["loo"]["interval"]
        assert record["loo"]["n"] == 30 and lo <= record["loo"]["accuracy"] <= hi
        assert (paths.checkpoint_dir("meta") / f"{name}.pt").exists()
    # unchanged config: skipped; a bad pool is refused before any work, naming the class and counts
    run_stage(get_stage("meta"), cfg)
    assert "unchanged" in capsys.readouterr().out
    code, err = run_script("04_meta.py", *overrides, "meta.pool=labeled", "meta.n_query=3", capsys=capsys)
    assert code == 2 and "labeled pool class" in err and "has only 3 image(s)" in err
    # the comparison command: meta methods and heads in one table, written to the run directory
    code, err = run_script("compare.py", *overrides, "--methods", "siamese", "--heads", "protonet", capsys=capsys)
    assert code == 0, err
    rows = io.read_json(paths.run / "compare.json")["rows"]
    assert {k: v["kind"] for k, v in rows.items()} == {"siamese": "meta", "protonet": "head"}
    assert rows["protonet"]["loo"]["n"] == 30 and rows["siamese"]["seconds"] > 0
    table = (paths.run / "compare.md").read_text()
    assert "| siamese | meta |" in table and "| protonet | head |" in table


def test_meta_config_errors_exit_2(tmp_path, capsys):
    code, err = run_script("04_meta.py", f"run.root={tmp_path}", "meta.methods=[maml, nope]", capsys=capsys)
    assert code == 2 and "unknown meta method 'nope'" in err
    with pytest.raises(UserError, match="meta.pool"):
        from src.stages.meta import validate

        validate(load_config(None, ["meta.pool=everything"]))
