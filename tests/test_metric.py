"""Metric learning: losses and miners by name, wiring to the right labels (a wrong-label wiring
must score worse), ArcFace centres as a cosine classifier, config errors, the stage end to end."""
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from src import io
from src.config import Config, MetricCfg, load_config
from src.errors import UserError
from src.metric.train import (MetricObjective, arcface_centres, arcface_logits, batch_shape, build_loss,
                              build_miner, validate)
from test_pseudo import blobs, fake_ssl  # tests/ is on sys.path (pytest rootdir conftest)



def _cfg(**metric) -> Config:
    cfg = Config()
    for k, v in metric.items():
        setattr(cfg.metric, k, v)
    return cfg


@pytest.mark.parametrize("name,cls", [("triplet", "TripletMarginLoss"), ("arcface", "ArcFaceLoss"),
                                      ("contrastive", "ContrastiveLoss"), ("multi_similarity", "MultiSimilarityLoss"),
                                      ("NTXentLoss", "NTXentLoss"), ("LiftedStructureLoss", "LiftedStructureLoss"),
                                      ("CircleLoss", "CircleLoss"), ("NPairsLoss", "NPairsLoss"),
                                      ("ProxyAnchorLoss", "ProxyAnchorLoss")])
def test_losses_by_name(name, cls):
    loss = build_loss(name, MetricCfg(), n_classes=10, dim=16)
    assert type(loss).__name__ == cls
    validate(_cfg(losses={name: 1.0}), 10, 16)  # computes on random embeddings


def test_loss_arguments_reach_the_loss():
    cfg = MetricCfg(margin=0.3, arcface_margin=20.0, arcface_scale=30.0, loss_kwargs={"CircleLoss": {"m": 0.3}})
    assert build_loss("triplet", cfg, 10, 16).margin == 0.3
    arc = build_loss("arcface", cfg, 10, 16)
    assert arc.scale == 30.0 and np.isclose(np.degrees(arc.margin), 20.0)
    assert build_loss("CircleLoss", cfg, 10, 16).m == 0.3
    sub = build_loss("arcface", MetricCfg(sub_centers=3), 10, 16)
    assert isinstance(sub, pml_losses.SubCenterArcFaceLoss) and arcface_centres(sub).shape == (10, 3, 16)


@pytest.mark.parametrize("name,cls,kind", [("semihard", "TripletMarginMiner", "semihard"),
                                           ("hard", "TripletMarginMiner", "hard"),
                                           ("all", "TripletMarginMiner", "all"),
                                           ("MultiSimilarityMiner", "MultiSimilarityMiner", None),
                                           ("BatchHardMiner", "BatchHardMiner", None)])
def test_miners_by_name(name, cls, kind):
    miner = build_miner(MetricCfg(miner=name))
    assert type(miner).__name__ == cls
    if kind:
        assert miner.type_of_triplets == kind
    assert build_miner(MetricCfg(miner="none")) is None


def test_mined_tuples_go_to_tuple_losses_only():
    obj = MetricObjective(MetricCfg(losses={"arcface": 1.0, "triplet": 1.0}), 10, 16)
    assert obj.tuple_loss == [False, True]
    x, y, _ = blobs(n_per=4, dim=16, sigma=0.5)
    total, parts = obj(torch.from_numpy(x), torch.from_numpy(y))
    torch.testing.assert_close(total, parts["arcface"] + parts["triplet"])


@pytest.mark.parametrize("override,key", [("metric.losses={nope: 1.0}", "metric.losses"),
                                          ("metric.miner=nope", "metric.miner"),
                                          ("metric.losses={triplet: 0.0}", "metric.losses.triplet"),
                                          ("metric.loss_kwargs={triplet: {nope: 1.0}}", "metric.loss_kwargs.triplet"),
                                          ("metric.losses={VICRegLoss: 1.0}", "metric.losses.VICRegLoss"),
                                          ("metric.augment=heavy", "metric.augment"),
                                          ("metric.m_per_class=1", "metric.m_per_class")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(load_config(None, [override]))


def test_cli_reports_an_unknown_loss_on_one_line_with_exit_2(capsys, tmp_path):
    from conftest import run_script

    code, err = run_script("03_metric.py", f"run.root={tmp_path}", "metric.losses={Tripletz: 1.0}", capsys=capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "metric.losses: unknown loss 'Tripletz'" in err


def test_batch_shape():
    assert batch_shape(MetricCfg(batch_size=256, m_per_class=0), 10) == (25, 250)
    assert batch_shape(MetricCfg(batch_size=64, m_per_class=8), 10) == (8, 64)
    assert batch_shape(MetricCfg(batch_size=256, m_per_class=8), 10) == (8, 80)  # at most 10 classes


@pytest.mark.parametrize("name", ["triplet", "contrastive", "multi_similarity", "NTXentLoss"])
def test_tuple_losses_are_wired_to_the_labels(name):
    """On separated blobs the loss with the true labels is far below the loss with shuffled labels."""
    x, y, _ = blobs(n_per=8, dim=16, sigma=0.2)
    obj = MetricObjective(MetricCfg(losses={name: 1.0}, miner="none"), 10, 16)
    emb, labels = torch.from_numpy(x), torch.from_numpy(y)
    right, _ = obj(emb, labels)
    wrong, _ = obj(emb, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    assert right < 0.8 * wrong, (name, float(right), float(wrong))


def _knn_acc(f: torch.Tensor, y: np.ndarray) -> float:
    f = torch.nn.functional.normalize(f, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    return float((y[sim.argmax(1).numpy()] == y).mean())


def _train_head(x, labels, losses, steps=30):
    """A linear map trained on the metric objective: returns (kNN accuracy before, after, loss drop)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(x.shape[1], 16)
    obj = MetricObjective(MetricCfg(losses=losses, miner="semihard"), 10, 16)
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": obj.parameters(), "lr": 0.5}], lr=0.1,
                          momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    first = None
    for _ in range(steps):
        loss, _ = obj(net(xt), yt)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(xt), first, float(obj(net(xt), yt)[0])


def test_training_on_the_right_labels_improves_knn_and_wrong_labels_do_not():
    """Blobs hidden in 32-D noise: training on true labels lifts kNN accuracy; training on shuffled
    labels (the wrong wiring) does not."""
    rng = np.random.default_rng(0)
    x, y, _ = blobs(n_per=12, dim=8, sigma=0.35)
    x = np.concatenate([x, 0.6 * rng.normal(size=(len(x), 24))], 1).astype(np.float32)  # distractor dims
    before = _knn_acc(torch.from_numpy(x), y)
    feats, first, last = _train_head(x, y, {"triplet": 1.0, "arcface": 1.0})
    after = _knn_acc(feats, y)
    assert last < 0.5 * first and after >= before + 0.4, (before, after)
    shuffled = rng.permutation(y)
    wrong_feats, _, _ = _train_head(x, shuffled, {"triplet": 1.0, "arcface": 1.0})
    assert _knn_acc(wrong_feats, y) < after - 0.4


def test_arcface_centres_are_a_cosine_classifier(tmp_path):
    loss = build_loss("arcface", MetricCfg(sub_centers=2), 10, 16)
    io.save_tensors(tmp_path / "a.safetensors", {"weight": arcface_centres(loss)}, metadata={"scale": str(loss.scale)})
    emb = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    ours = arcface_logits(emb.numpy(), tmp_path / "a.safetensors")
    ref = (loss.get_cosine(emb) * loss.scale).detach().numpy()  # pml: max over sub-centres, times scale
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_metric_stage_end_to_end(comp, digits_folder, tmp_path):
    from src.data.dataset import load_data
    from src.paths import RunPaths
    from src.stages import get_stage, run_stage

    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu", "run.progress=false",
                             f"data.path={comp}", f"data.truth={digits_folder.parent / 'truth.csv'}",
                             "metric.epochs=2", "metric.batch_size=20", "metric.max_steps_per_epoch=2",
                             "metric.losses={arcface: 1.0, triplet: 1.0, contrastive: 0.5}"])
    run_stage(get_stage("prepare"), cfg)
    fake_ssl(cfg)
    summary = run_stage(get_stage("metric"), cfg)
    paths = RunPaths(cfg)
    n = len(load_data(paths).images)
    assert summary["source"] == "ssl" and summary["train_images"] == 30  # no pseudo stage: labeled only
    assert set(summary["parts"]) == {"arcface", "triplet", "contrastive"} and "arcface_truth" in summary
    emb = io.read_npy(paths.embeddings("metric"))
    assert emb.shape[0] == n and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    assert paths.encoder("metric").exists() and len(io.read_jsonl(paths.log("metric"))) == 2
    assert io.load_tensors(paths.arcface)["weight"].shape[:2] == (10, 1)
