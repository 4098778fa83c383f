"""SwAV and DeepCluster-v2 (src/ssl/clustering.py): the Sinkhorn-Knopp step against the paper's
algorithm in numpy, swapped prediction, queue and prototype freezing, DeepCluster-v2's memory bank,
k-means assignment step and targets against references, config errors, and the 01_ssl stage with
both objectives. Training on a fixed batch and DDP are in tests/test_ssl.py and tests/test_ddp.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src import io
from src.config import BackboneCfg, SSLCfg, load_config
from src.errors import UserError
from src.models.encoder import Encoder
from src.paths import RunPaths
from src.ssl.clustering import DeepClusterV2, SwAV, sinkhorn_knopp, soft_cross_entropy
from src.ssl.trainer import validate
from src.stages import get_stage, run_stage

TINY = dict(proj_hidden=32, proj_dim=16, swav_prototypes=8, deepcluster_prototypes=[4, 3])
RESNET = BackboneCfg(name="resnet18", width=4, stem_width=8, small_stem=False)


def sinkhorn_reference(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Algorithm 1 of Caron et al. 2020 (appendix A.1), in float64 numpy. scores (B, K) -> codes (B, K)."""
    q = np.exp(scores / eps).T  # (K, B)
    q /= q.sum()
    k, b = q.shape
    r, c = np.ones(k) / k, np.ones(b) / b
    for _ in range(iters):
        q *= (r / q.sum(1))[:, None]
        q *= (c / q.sum(0))[None, :]
    return (q / q.sum(0, keepdims=True)).T


def cosines(b, k, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


def test_sinkhorn_matches_the_papers_algorithm_and_equipartitions():
    s = cosines(10, 4)
    for eps, iters in ((0.05, 3), (0.3, 1), (0.1, 7)):
        ours = sinkhorn_knopp(s, eps, iters).numpy()
        ref = sinkhorn_reference(s.numpy().astype(np.float64), eps, iters)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)  # one distribution per sample
    # converged: every prototype receives B / K samples' worth of mass
    np.testing.assert_allclose(sinkhorn_knopp(s, 0.3, 200).sum(0).numpy(), 10 / 4, rtol=1e-3)
    # exp(1 / 0.011) overflows float32: the global-max shift keeps the same codes finite
    s = cosines(8, 5, seed=1)
    s[2, 1] = 0.99
    assert torch.isinf(torch.exp(s / 0.011)).any()
    np.testing.assert_allclose(sinkhorn_knopp(s, 0.011, 3).numpy(),
                               sinkhorn_reference(s.numpy().astype(np.float64), 0.011, 3), rtol=1e-3, atol=1e-6)


def test_swav_swapped_prediction_matches_manual_loss():
    torch.manual_seed(0)
    enc = Encoder(RESNET)
    swav = SwAV(SSLCfg(**TINY, swav_temperature=0.2), enc).eval()
    feats = [torch.randn(6, enc.dim) for _ in range(2)]
    local = [torch.randn(6, enc.dim)]
    z = F.normalize(swav.projector(torch.cat(feats + local)), dim=1).chunk(3)
    c = F.normalize(swav.prototypes, dim=1)
    scores = [zi @ c.T for zi in z]
    q = [sinkhorn_reference(scores[i].detach().numpy().astype(np.float64), 0.05, 3) for i in range(2)]

    def ce(codes, logits):
        return -(torch.tensor(codes, dtype=torch.float32) * torch.log_softmax(logits / 0.2, 1)).sum(1).mean()

    manual = 0.5 * ((ce(q[0], scores[1]) + ce(q[0], scores[2])) / 2 + (ce(q[1], scores[0]) + ce(q[1], scores[2])) / 2)
    assert swav(feats, local, None, enc).item() == pytest.approx(manual.item(), rel=1e-4)
    assert soft_cross_entropy(torch.eye(3), torch.zeros(3, 3)).item() == pytest.approx(np.log(3), rel=1e-6)


def test_swav_queue_joins_the_sinkhorn_batch_once_full():
    torch.manual_seed(0)
    enc = Encoder(RESNET)
    swav = SwAV(SSLCfg(**TINY, swav_queue_length=8), enc).train()
    batches = [[torch.randn(4, enc.dim) for _ in range(2)] for _ in range(3)]
    swav(batches[0], [], None, enc)
    assert swav.queue_filled == 4  # half full: not used yet
    swav(batches[1], [], None, enc)
    with torch.no_grad():
        z = [F.normalize(swav.projector(torch.cat(b)), dim=1).view(2, 4, -1) for b in batches[:2]]
    assert swav.queue_filled == 8 and torch.allclose(swav.queue, torch.cat([z[1], z[0]], 1), atol=1e-5)  # newest first
    w = F.normalize(swav.prototypes.detach(), dim=1)
    s = torch.randn(4, 8)
    joined = sinkhorn_reference(torch.cat([swav.queue[1] @ w.T, s]).numpy().astype(np.float64), 0.05, 3)[-4:]
    np.testing.assert_allclose(swav.codes(1, s, w).numpy(), joined, rtol=1e-4, atol=1e-6)
    assert not np.allclose(joined, sinkhorn_reference(s.numpy().astype(np.float64), 0.05, 3), atol=1e-3)


def test_swav_prototypes_frozen_for_the_first_steps():
    torch.manual_seed(0)
    enc = Encoder(RESNET)
    swav = SwAV(SSLCfg(**TINY, swav_freeze_prototypes_steps=2), enc).train()
    grads = []
    for _ in range(3):
        swav.zero_grad()
        swav([torch.randn(4, enc.dim) for _ in range(2)], [], None, enc).backward()
        grads.append(swav.prototypes.grad.abs().sum().item())
        assert swav.projector[0].weight.grad.abs().sum() > 0  # the rest of the head still learns
    assert grads[0] == grads[1] == 0.0 and grads[2] > 0


def _deepcluster(**kw):
    torch.manual_seed(0)
    enc = Encoder(RESNET)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    dc = DeepClusterV2(SSLCfg(**{**TINY, **kw}), enc)
    dc.on_epoch_start(0, enc, images)
    return enc, dc, images


def test_deepcluster_memory_assignments_and_targets_against_references():
    enc, dc, images = _deepcluster(deepcluster_prototypes=[5, 3, 4])
    # memory: the clean images' L2-normalised projections, in eval mode (running BN statistics)
    enc.eval(), dc.eval()
    with torch.no_grad():
        from src.models.encoder import to_input

        clean = F.normalize(dc.projector(enc(to_input(torch.from_numpy(images)))), dim=1)
    assert dc.memory.shape == (2, 40, 16)
    assert torch.allclose(dc.memory[0], clean, atol=1e-5) and torch.allclose(dc.memory[1], clean, atol=1e-5)
    # assignment step: each image's nearest centroid by cosine (head h clusters memory view h mod 2)
    assert [len(c) for c in dc.centroids] == [5, 3, 4] and dc.assignments.shape == (3, 40)
    for h, c in enumerate(dc.centroids):
        np.testing.assert_allclose(np.linalg.norm(c.numpy(), axis=1), 1.0, atol=1e-5)
        reference = (dc.memory[h % 2].numpy() @ c.numpy().T).argmax(1)
        np.testing.assert_array_equal(dc.assignments[h].numpy(), reference)
    # loss: cross-entropy of every view against its image's cluster, averaged over heads
    feats = [torch.randn(6, enc.dim) for _ in range(2)]
    rows = torch.tensor([3, 17, 0, 39, 8, 8])
    z = F.normalize(dc.projector(torch.cat(feats)), dim=1)
    manual = sum(F.cross_entropy(z @ c.T / 0.1, dc.assignments[h, rows].repeat(2))
                 for h, c in enumerate(dc.centroids)) / 3
    assert dc(feats, [], None, enc, rows).item() == pytest.approx(manual.item(), rel=1e-5)
    # training mode writes the views' projections into the bank at their rows
    dc.train()
    rows = torch.tensor([5, 6, 7, 1, 2, 3])
    dc(feats, [], None, enc, rows)
    with torch.no_grad():
        z = F.normalize(dc.projector(torch.cat(feats)), dim=1)
    assert torch.allclose(dc.memory[0, rows], z[:6], atol=1e-5) and torch.allclose(dc.memory[1, rows], z[6:], atol=1e-5)
    assert torch.allclose(dc.memory[0, 10], clean[10], atol=1e-5)  # other rows untouched


def test_deepcluster_refresh_follows_the_memory():
    """k-means of a bank with 3 well-separated groups: the refreshed assignments recover them."""
    enc, dc, _ = _deepcluster(deepcluster_prototypes=[3])
    centers = F.normalize(torch.randn(3, 16), dim=1)
    groups = torch.arange(40) % 3
    dc.memory[:] = F.normalize(centers[groups] + 0.01 * torch.randn(40, 16), dim=1)
    dc.cluster(epoch=1)
    a = dc.assignments[0]
    assert len(set(a.tolist())) == 3 and all(len(set(a[groups == g].tolist())) == 1 for g in range(3))


def test_config_errors_name_the_key():
    cfg = load_config(None, ["ssl.objectives={deepcluster: 1.0}"])
    validate(cfg)
    for override, message in [
        ("ssl.deepcluster_prototypes=[]", "ssl.deepcluster_prototypes: need one or more k >= 2"),
        ("ssl.deepcluster_prototypes=[10, 1]", "ssl.deepcluster_prototypes: need one or more k >= 2"),
        ("ssl.deepcluster_temperature=0", "ssl.deepcluster_temperature: must be positive"),
        ("ssl.gpu_augment=cpu", "ssl.gpu_augment: deepcluster needs the batched augmentation path"),
    ]:
        with pytest.raises(UserError, match=message):
            validate(load_config(None, ["ssl.objectives={deepcluster: 1.0}", override]))
    for override, message in [("ssl.swav_epsilon=0", "ssl.swav_epsilon: must be positive"),
                              ("ssl.swav_prototypes=0", "ssl.swav_prototypes: must be positive"),
                              ("ssl.swav_queue_length=-1", "ssl.swav_queue_length: must be >= 0")]:
        with pytest.raises(UserError, match=message):
            validate(load_config(None, ["ssl.objectives={swav: 1.0}", override]))
    with pytest.raises(UserError, match="ssl.deepcluster_prototypes: k = 50 clusters, but there are only 40"):
        _deepcluster(deepcluster_prototypes=[50])


def test_stage_trains_swav_and_deepcluster(tmp_path):
    """01_ssl end to end: the trainer calls on_epoch_start and passes each batch's rows."""
    root = tmp_path
    cfg = load_config(None, [
        f"run.root={root}/runs", "run.name=t", "run.progress=false", "run.device=cpu", f"data.path={root}/digits",
        "data.builder=digits", "data.demo_test_size=100", "backbone.width=4", "backbone.stem_width=8",
        "backbone.small_stem=false", "ssl.epochs=2", "ssl.batch_size=32", "ssl.max_steps_per_epoch=3",
        "ssl.proj_hidden=32", "ssl.proj_dim=16", "ssl.probe_every=2", "ssl.warmup_epochs=0",
        "ssl.objectives={swav: 1.0, deepcluster: 0.5}", "ssl.swav_prototypes=20", "ssl.swav_queue_length=32",
        "ssl.deepcluster_prototypes=[10, 20]", "ssl.deepcluster_kmeans_iters=3"])
    run_stage(get_stage("prepare"), cfg)
    summary = run_stage(get_stage("ssl"), cfg)
    log = io.read_jsonl(RunPaths(cfg).log("ssl"))
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["parts"]["swav"]) and np.isfinite(r["parts"]["deepcluster"]) for r in log)
    assert 0.0 <= summary["knn_loo_labeled"] <= 1.0
