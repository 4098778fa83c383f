"""Task augmentation of meta-training episodes (src/meta/task_augment.py): rotated copies are classes
of their own with consistent labels, rotated body inputs against np.rot90 references, seeded
per-episode image augmentation, and the 04_meta stage / compare.py with the switch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src import io
from src.config import BackboneCfg, load_config
from src.errors import UserError
from src.meta.base import FeatureBank, trunk_features
from src.meta.sampler import EpisodeSampler, Pool
from src.meta.task_augment import (AugmentedSampler, EpisodeBank, TaskAugment, build_task_augment, parse_mode,
                                   rot90_each, rotated_bank, rotated_pool, split_virtual)
from src.models.encoder import Encoder, embed
from tests.conftest import run_script
from tests.test_meta import _fake_ssl

CPU = torch.device("cpu")


def test_rotated_copies_are_classes_of_their_own_with_consistent_labels():
    n_total = 100
    labels = np.repeat(np.arange(3), 4)  # 3 base classes x 4 images
    pool = Pool(np.arange(50, 62), labels, "pseudo")
    rot = rotated_pool(pool, n_total)
    assert len(rot) == 48 and len(rot.class_counts()) == 12 and set(rot.class_counts().values()) == {4}
    sampler = EpisodeSampler(rot, n_way=5, n_shot=1, n_query=2)
    same_base_twice = False
    for seed in range(20):
        ep = sampler.sample(np.random.default_rng(seed))
        assert ep.support_rows.shape == (5,) and ep.query_rows.shape == (10,)
        for rows, ys in ((ep.support_rows, ep.support_y), (ep.query_rows, ep.query_y)):
            image, turns = split_virtual(rows, n_total)
            assert set(image) <= set(range(50, 62))
            # the label's class is (base class of the image, its rotation): rotations are distinct classes
            np.testing.assert_array_equal(ep.classes[ys], labels[image - 50] * 4 + turns)
        base = ep.classes // 4
        same_base_twice |= len(set(base)) < len(base)  # two rotations of one base class in one episode
        assert len(set(ep.classes)) == 5
    assert same_base_twice
    with pytest.raises(UserError, match="meta.task_augment: expected one of none, rot90, image, rot90\\+image"):
        parse_mode("flip")


def test_rot90_each_matches_np_rot90():
    x = torch.randint(0, 255, (6, 5, 5, 3), dtype=torch.uint8)
    k = torch.tensor([0, 1, 2, 3, 1, 3])
    out = rot90_each(x, k)
    for i in range(6):
        np.testing.assert_array_equal(out[i].numpy(), np.rot90(x[i].numpy(), int(k[i]), axes=(0, 1)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    encoder = Encoder(BackboneCfg(name="resnet18", width=4), 32).eval()
    images = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    rows = np.arange(12)
    bank = FeatureBank(rows, trunk_features(encoder, images, rows, CPU, precision="fp32"), 12)
    return encoder, images, bank


def test_rotated_bank_against_rotated_images(setup):
    encoder, images, bank = setup
    pool_rows = np.array([2, 5, 7])
    rot = rotated_bank(bank, encoder, images, pool_rows, 12, train_block=True, device=CPU, precision="fp32")
    for r in range(4):
        turned = np.ascontiguousarray(np.rot90(images[pool_rows], r, axes=(1, 2)))
        ref = trunk_features(encoder, turned, np.arange(3), CPU, precision="fp32").float()
        torch.testing.assert_close(rot[pool_rows + r * 12], ref)
    with pytest.raises(KeyError):
        rot[np.array([3])]  # not a pool row
    # frozen embeddings (meta.train_block=false): the encoder's L2-normalised embedding of the turned image
    emb = FeatureBank(np.arange(12), torch.from_numpy(embed(encoder, images, CPU, precision="fp32")).half(), 12)
    rot = rotated_bank(emb, encoder, images, pool_rows, 12, train_block=False, device=CPU, precision="fp32")
    turned = np.ascontiguousarray(np.rot90(images[pool_rows], 3, axes=(1, 2)))
    torch.testing.assert_close(rot[pool_rows + 36], torch.from_numpy(embed(encoder, turned, CPU, precision="fp32")),
                               atol=2e-3, rtol=1e-2)  # float16 bank


def test_episode_image_augmentation_is_seeded_per_episode(setup):
    encoder, images, bank = setup
    aug = build_task_augment("rot90+image", False, bank, encoder, images, np.arange(12), True, CPU, "fp32")
    sampler = aug.sampler(Pool(np.arange(12), np.repeat(np.arange(3), 4), "pseudo"), 4, 1, 2)
    assert isinstance(sampler, AugmentedSampler) and isinstance(aug.bank, EpisodeBank)
    ep = sampler.sample(np.random.default_rng(0))
    again = sampler.sample(np.random.default_rng(0))
    assert ep.augment_seed == again.augment_seed  # a function of the episode generator: resumable
    xs, xq = aug.bank.task_inputs(ep)
    assert xs.shape == (4, 32, 4, 4) and xq.shape == (8, 32, 4, 4) and xs.dtype == torch.float32
    torch.testing.assert_close(aug.bank.task_inputs(again)[0], xs)
    ep.augment_seed += 1
    assert not torch.allclose(aug.bank.task_inputs(ep)[0], xs)  # another seed, other augmentations
    # without its augmentation, the per-episode path equals the precomputed rotations
    plain = EpisodeBank(encoder, images, np.arange(12), 12, True, None, CPU, "fp32")
    rot = rotated_bank(bank, encoder, images, np.arange(12), 12, True, CPU, "fp32")
    torch.testing.assert_close(plain.task_inputs(ep)[0], rot[ep.support_rows], atol=2e-3, rtol=1e-2)
    assert build_task_augment("none", True, bank, encoder, images, np.arange(12), True, CPU, "fp32") is None
    assert isinstance(TaskAugment("rot90", 12, rot).sampler(Pool(np.arange(12), np.zeros(12, int), "pseudo"),
                                                             4, 1, 1), EpisodeSampler)


def test_stage_and_compare_with_task_augmentation(comp, tmp_path, capsys):
    from src.stages import get_stage, run_stage

    overrides = [f"data.path={comp}", "data.truth=", f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu",
                 "run.progress=false", "meta.methods=[siamese, fomaml]", "meta.pool=clusters", "meta.clusters=12",
                 "meta.episodes=2", "meta.meta_batch=1", "meta.n_way=3", "meta.n_query=2", "meta.inner_steps=1",
                 "meta.test_inner_steps=1", "meta.task_augment=rot90+image", "meta.task_augment_flip=false",
                 "meta.pool_per_class=20"]
    cfg = load_config(None, overrides)
    paths = _fake_ssl(cfg)
    summary = run_stage(get_stage("meta"), cfg)
    assert "task augmentation rot90+image" in capsys.readouterr().out
    records = {m: io.read_json(paths.head_dir(m, "meta") / "summary.json") for m in ("siamese", "fomaml")}
    assert records["fomaml"]["task_augment"] == "rot90+image" and records["siamese"]["task_augment"] == "none"
    assert io.read_npy(paths.head_probs("fomaml", "meta")).shape[1] == 10 and summary["methods"]["fomaml"]
    code, err = run_script("compare.py", *overrides, "meta.task_augment=rot90", "--methods", "protonet_episodic",
                           "--heads", "", capsys=capsys)
    assert code == 0, err
    assert "task augmentation rot90 (methods: protonet_episodic)" in (paths.run / "compare_rot90.md").read_text()
    assert io.read_json(paths.run / "compare_rot90.json")["rows"]["protonet_episodic"]["task_augment"] == "rot90"
    code, err = run_script("04_meta.py", *overrides, "meta.task_augment=rot180", capsys=capsys)
    assert code == 2 and "meta.task_augment: expected one of" in err
