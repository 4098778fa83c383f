"""SSL objectives against reference computations, smoke training of every objective on two
backbones, training utilities (LARS, schedules, checkpoints, LR range test), the kNN probe, and
the 01_ssl stage end to end (outputs, resume after interruption, --lr-find, config errors)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

from src import io
from src.augment import GpuAugment
from src.config import BackboneCfg, SSLCfg, load_config
from src.errors import UserError
from src.models.encoder import Encoder, load_encoder
from src.paths import RunPaths
from src.probe import knn_kfold_accuracy, knn_loo_accuracy, knn_predict
from src.ssl.objectives import (BYOL, DINO, OBJECTIVES, SimSiam, SSLModel, cosine_regression, dino_loss, nt_xent,
                                rotate_batch)
from src.stages import get_stage, run_stage
from src.train_utils import (LARS, Checkpointer, cosine_ramp, ema_update, lr_range_test, plot_lr_find,
                             warmup_cosine)
from src.runtime import REPO_ROOT

TINY = dict(proj_hidden=32, proj_dim=16, dino_out_dim=64, dino_bottleneck=16, swav_prototypes=16,
            deepcluster_prototypes=[4, 3])
RESNET = BackboneCfg(name="resnet18", width=4, stem_width=8, small_stem=False)




# ---------------------------------------------------------------------------------------------
# Losses against references
# ---------------------------------------------------------------------------------------------
def test_nt_xent_matches_pytorch_metric_learning_and_direct_formula():
    torch.manual_seed(0)
    b, t = 6, 0.2
    for v in (2, 3):
        z = torch.randn(v * b, 8, requires_grad=True)
        ours = nt_xent(z, v, t)
        ours.backward()
        grad = z.grad.clone()
        z.grad = None
        ref = NTXentLoss(temperature=t)(z, torch.arange(b).repeat(v))
        ref.backward()
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(grad, z.grad, atol=1e-6)
    # direct formula for two views: -log(e^{s_ip}/sum_{k != i} e^{s_ik}) averaged over the 2B anchors
    zn = F.normalize(torch.randn(2 * b, 8), dim=1).numpy().astype(np.float64)
    sim = zn @ zn.T / t
    total = 0.0
    for i in range(2 * b):
        p = (i + b) % (2 * b)
        total += -(sim[i, p] - np.log(sum(np.exp(sim[i, k]) for k in range(2 * b) if k != i)))
    assert nt_xent(torch.tensor(zn, dtype=torch.float32), 2, t).item() == pytest.approx(total / (2 * b), rel=1e-5)


def test_byol_and_simsiam_losses_match_hand_formulas():
    torch.manual_seed(0)
    p, z = torch.randn(5, 4), torch.randn(5, 4)
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    assert cosine_regression(p, z).item() == pytest.approx(((pn - zn) ** 2).sum(1).mean().item(), rel=1e-5)

    enc = Encoder(RESNET)
    feats = [torch.randn(6, enc.dim), torch.randn(6, enc.dim)]
    simsiam = SimSiam(SSLCfg(**TINY), enc)
    z1, z2 = simsiam.projector(torch.cat(feats)).chunk(2)
    p1, p2 = simsiam.predictor(torch.cat([z1, z2])).chunk(2)
    manual = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert simsiam(feats, [], None, enc).item() == pytest.approx(manual.item(), rel=1e-5)

    byol = BYOL(SSLCfg(**TINY), enc).eval()  # eval: BN uses running stats, so pieces compose
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    f = [enc.eval()(v) for v in views]
    q = [byol.predictor(byol.projector(x)) for x in f]
    with torch.no_grad():
        t = [byol.teacher_head(byol.teacher(v)) for v in views]
    manual = sum((2 - 2 * F.cosine_similarity(q[i], t[1 - i])).mean() for i in range(2))
    assert byol(f, [], views, enc).item() == pytest.approx(manual.item(), rel=1e-4)


def test_dino_loss_matches_manual_cross_entropy_with_centering():
    torch.manual_seed(0)
    b, k, ts, tt = 4, 7, 0.1, 0.04
    student = [torch.randn(b, k) for _ in range(4)]  # 2 global + 2 local views
    teacher = torch.randn(2 * b, k)
    center = torch.randn(1, k)
    ours = dino_loss(student, teacher, center, ts, tt, n_global=2).item()
    s = [x.numpy().astype(np.float64) for x in student]
    t = (teacher - center).numpy().astype(np.float64) / tt
    terms = []
    for q in range(2):
        tq = np.exp(t[q * b:(q + 1) * b] - t[q * b:(q + 1) * b].max(1, keepdims=True))
        tq /= tq.sum(1, keepdims=True)
        for v in range(4):
            if v != q:
                logp = s[v] / ts - np.log(np.exp(s[v] / ts).sum(1, keepdims=True))
                terms.append(-(tq * logp).sum(1).mean())
    assert ours == pytest.approx(np.mean(terms), rel=1e-5)


def test_dino_center_follows_teacher_mean():
    enc = Encoder(RESNET)
    dino = DINO(SSLCfg(**TINY, dino_center_momentum=0.9), enc)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    feats = [enc(v) for v in views]
    with torch.no_grad():
        teacher_mean = dino.teacher_head(dino.teacher(torch.cat(views))).mean(0, keepdim=True)
    dino(feats, [], views, enc)
    assert torch.allclose(dino.center, 0.1 * teacher_mean, atol=1e-6)


def test_rotation_targets_and_ema():
    x = torch.randn(8, 3, 5, 5)
    rotated, k = rotate_batch(x)
    for i in range(8):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(k[i]), dims=(1, 2))) and k[i] == i % 4
    target, source = [torch.ones(3)], [torch.zeros(3)]
    ema_update(target, source, 0.9)
    assert torch.allclose(target[0], torch.full((3,), 0.9))


def test_weighted_combination():
    torch.manual_seed(0)
    enc = Encoder(RESNET)
    model = SSLModel(enc, SSLCfg(objectives={"simclr": 1.0, "rotation": 0.5}, **TINY))
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    total, parts = model(views)
    assert set(parts) == {"simclr", "rotation"}
    assert total.item() == pytest.approx(parts["simclr"].item() + 0.5 * parts["rotation"].item(), rel=1e-6)
    with pytest.raises(UserError, match="unknown objective 'nope'"):
        SSLModel(enc, SSLCfg(objectives={"nope": 1.0}))


# ---------------------------------------------------------------------------------------------
# Every objective x two backbones: a few steps on one fixed batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", [RESNET,
                                      BackboneCfg(name="test_vit")], ids=["resnet18_w4", "test_vit"])
@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_every_objective_trains(backbone, objective):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    cfg = SSLCfg(objectives={objective: 1.0}, n_local_crops=2 if objective == "dino" else 0, **TINY)
    model = SSLModel(Encoder(backbone, 32), cfg)
    aug, g = GpuAugment(32), torch.Generator().manual_seed(0)
    views = [aug(images, g), aug(images, g)]
    local = [GpuAugment(16 if "resnet" in backbone.name else 32, crop_scale=(0.05, 0.3))(images, g) for _ in range(2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.on_epoch_start(0, images.numpy())  # deepcluster: k-means targets
    losses = []
    for _ in range(8):
        loss, _ = model(views, local if model.uses_local else [], rows=torch.arange(len(images)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_teachers(0.9)
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert min(losses[-2:]) < losses[0], losses


# ---------------------------------------------------------------------------------------------
# Training utilities
# ---------------------------------------------------------------------------------------------
def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, eta=0.01)
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])  # [0.9, 1.2], |d| = 1.5
    q = 0.01 * 5 / 1.5
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * q * d, atol=1e-6)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


def test_schedules():
    lrs = warmup_cosine(1.0, 100, 10, final=0.1)
    assert len(lrs) == 100 and lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert np.all(np.diff(lrs[10:]) <= 1e-12)
    ema = cosine_ramp(0.99, 1.0, 50)
    assert ema[0] == pytest.approx(0.99) and ema[-1] == pytest.approx(1.0) and np.all(np.diff(ema) >= 0)


def test_checkpointer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, model, opt, steps_per_epoch=7)
    ckpt.save(2, model, opt, steps_per_epoch=7)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*")) == ["epoch_0002.pt", "epoch_0002.safetensors"]
    expected = torch.rand(3)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = ckpt.load(fresh, fresh_opt)
    assert state["epoch"] == 2 and state["steps_per_epoch"] == 7
    assert torch.equal(torch.rand(3), expected)  # RNG restored to the moment of saving
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"],
                       fresh_opt.state_dict()["state"][0]["momentum_buffer"])
    assert Checkpointer(tmp_path / "none").load(fresh) is None


def test_lr_range_test_on_a_quadratic(tmp_path):
    w = torch.nn.Parameter(torch.tensor([5.0]))
    opt = torch.optim.SGD([w], lr=1e-4)

    def step():
        loss = (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    result = lr_range_test(step, opt, 1e-4, 100.0, steps=80)
    # gradient descent on w^2 diverges for lr > 1: the suggestion must sit well below that
    assert 1e-3 < result["suggested_lr"] < 1.0 and len(result["losses"]) < 80
    assert plot_lr_find(result, tmp_path / "lr.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# kNN probe
# ---------------------------------------------------------------------------------------------
def test_knn_majority_vote_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
    labels = rng.integers(0, 3, 60)
    ours = knn_predict(ref, labels, query, k=7, temperature=None, balanced=False).argmax(1).numpy()
    sk = KNeighborsClassifier(7, metric="cosine", algorithm="brute").fit(ref, labels).predict(query)
    assert (ours == sk).mean() >= 0.96  # sklearn breaks exact vote ties by class index


def test_knn_probe_on_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16)) * 3
    labels = np.repeat(np.arange(10), 3)
    feats = centers[labels] + rng.normal(size=(30, 16)) * 0.5
    assert knn_loo_accuracy(feats, labels, k=20) == 1.0
    assert knn_loo_accuracy(rng.normal(size=(30, 16)), labels, k=20) < 0.5
    labels = np.repeat(np.arange(10), 20)
    assert knn_kfold_accuracy(centers[labels] + rng.normal(size=(200, 16)) * 0.5, labels, k=20) == 1.0


# ---------------------------------------------------------------------------------------------
# The stage end to end on a small digits competition
# ---------------------------------------------------------------------------------------------
def tiny_cfg(root, *extra):
    return load_config(None, [
        f"run.root={root}/runs", "run.name=t", "run.progress=false", "run.device=cpu",
        f"data.path={root}/digits", "data.builder=digits", f"data.truth={root}/truth.csv", "data.demo_test_size=100",
        "backbone.width=4", "backbone.stem_width=8", "backbone.small_stem=false", "ssl.epochs=3",
        "ssl.batch_size=32",
        "ssl.max_steps_per_epoch=2", "ssl.proj_hidden=32", "ssl.proj_dim=16", "ssl.checkpoint_every=1",
        "ssl.probe_every=2", "ssl.warmup_epochs=1", "ssl.embed_batch_size=512", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_stage")
    run_stage(get_stage("prepare"), tiny_cfg(root))
    return root


def test_stage_outputs_and_resume(prepared, monkeypatch):
    from src.ssl import trainer
    from src.train_utils import Checkpointer as Ckpt

    cfg = tiny_cfg(prepared)
    paths = RunPaths(cfg)
    original = Ckpt.save

    def save_then_die(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt  # the process is killed right after the epoch-2 checkpoint

    monkeypatch.setattr(Ckpt, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage(get_stage("ssl"), cfg)
    assert [r["epoch"] for r in io.read_jsonl(paths.log("ssl"))] == [1, 2]
    assert not paths.done_marker("ssl").exists()

    monkeypatch.setattr(Ckpt, "save", original)
    steps = []
    real_step = trainer.SSLRun.step
    monkeypatch.setattr(trainer.SSLRun, "step",
                        lambda self, v, lv, g, *r: steps.append(g) or real_step(self, v, lv, g, *r))
    summary = run_stage(get_stage("ssl"), cfg)
    assert steps == [4, 5]  # only epoch 3 (global steps 4, 5) was trained again
    assert io.read_json(paths.stage("ssl") / "meta.json")["resumed"] is True
    log = io.read_jsonl(paths.log("ssl"))
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["views_per_s"] > 0 for r in log)
    assert "knn_loo_labeled" in log[1] and "knn_5fold_truth" in log[2] and "knn_loo_labeled" not in log[0]

    data_n = len(io.read_npy(paths.images, mmap=True))
    emb = io.read_npy(paths.embeddings("ssl"))
    assert emb.dtype == np.float16 and emb.shape == (data_n, 32)  # width 4 -> 8 * 4 features
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    encoder = load_encoder(paths.encoder("ssl"), paths.encoder_spec("ssl"))
    assert encoder.dim == 32
    for key in ("knn_loo_labeled", "knn_5fold_truth", "pixels_knn_loo_labeled", "pixels_knn_5fold_truth"):
        assert 0.0 <= summary[key] <= 1.0
    # unchanged config: skipped without training
    steps.clear()
    run_stage(get_stage("ssl"), cfg)
    assert steps == []


def test_lr_find_writes_plot(prepared):
    cfg = tiny_cfg(prepared, "run.name=lrf", "ssl.lr_find_steps=12")
    run_stage(get_stage("prepare"), cfg)
    result = run_stage(get_stage("ssl"), cfg, lr_find=True)
    paths = RunPaths(cfg)
    assert paths.plot("ssl", "lr_find").stat().st_size > 1000
    assert result["suggested_lr"] > 0 and json.loads((paths.stage("ssl") / "lr_find.json").read_text())["losses"]


def test_bad_config_fails_before_work(prepared):
    cfg = tiny_cfg(prepared, "run.name=bad")
    run_stage(get_stage("prepare"), cfg)
    with pytest.raises(UserError, match="ssl.optimizer: unknown optimizer 'rmsprop'"):
        run_stage(get_stage("ssl"), tiny_cfg(prepared, "run.name=bad", "ssl.optimizer=rmsprop"))
    with pytest.raises(UserError, match="ssl.objectives.simclr: weight must be positive"):
        run_stage(get_stage("ssl"), tiny_cfg(prepared, "run.name=bad", "ssl.objectives={simclr: 0}"))
    args = [f"run.root={cfg.run.root}", "run.name=bad", f"data.path={cfg.data.path}", "data.demo_test_size=100",
            "ssl.gpu_augment=tpu"]
    proc = subprocess.run([sys.executable, "pipelines/01_ssl.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "ssl.gpu_augment: expected auto, gpu or cpu" in proc.stderr
