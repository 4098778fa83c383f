"""The real competition's path in CI: stage 00 on the real archive with the CPU recipe's config, then
a few training steps of the recipe's SSL model on the real cache (the full recipe is a benchmark:
`python pipelines/bench.py pipeline -c configs/cifar_cpu.yaml`). Skipped where ../shared is absent."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, run_script

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-2shot" / "competition.tar.xz"
pytestmark = pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} not here")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """00_prepare on the real archive (extract + validate + decode 60,000 JPEGs, ~30 s on 2 cores)."""
    root = tmp_path_factory.mktemp("real")
    overrides = ["-c", str(REPO / "configs" / "cifar_cpu.yaml"), f"data.archive={ARCHIVE}",
                 f"data.path={root / 'input'}", f"run.root={root / 'runs'}", f"run.submissions_dir={root / 'subs'}",
                 "run.progress=false", "data.truth="]
    code, err = run_script("00_prepare.py", *overrides)
    assert code == 0, err
    from src.config import load_config
    from src.paths import RunPaths

    cfg = load_config(str(REPO / "configs" / "cifar_cpu.yaml"), overrides[2:])
    return cfg, RunPaths(cfg)


def test_real_archive_prepares_to_the_competition_shape(real_run):
    cfg, paths = real_run
    from src.data.dataset import load_data

    data = load_data(paths)
    assert data.images.shape == (60_000, 32, 32, 3) and data.images.dtype == np.uint8
    counts = pd.read_csv(paths.index)["split"].value_counts().to_dict()
    assert counts == {"train": 49_990, "test": 10_000, "val": 10}, counts
    assert data.n_classes == 10 and len(data.test_idx) == 10_000
    assert np.bincount(data.class_ids[data.labeled_idx], minlength=10).tolist() == [3] * 10


def test_recipe_ssl_steps_on_the_real_cache(real_run):
    """Three steps of the recipe's SimCLR model (width 16, CIFAR stem, 16x16 views, channels_last)
    on 512 real images: finite loss, weights move, embeddings at 32x32 of the right shape."""
    from src.data.dataset import load_data
    from src.ssl.trainer import SSLRun
    from src.ssl.views import make_views

    cfg, paths = real_run
    assert cfg.ssl.view_size == 16 and cfg.backbone.small_stem and cfg.backbone.width == 16
    cfg = dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, batch_size=64, epochs=1, max_steps_per_epoch=3))
    images = np.ascontiguousarray(load_data(paths).images[:512])
    device = torch.device("cpu")
    run = SSLRun(cfg, len(images), device)
    run.wrap()
    assert run.channels_last  # the recipe's net is wide enough for NHWC on the CPU (src.runtime.use_channels_last)
    before = [p.detach().clone() for p in run.encoder.parameters()]
    views = make_views(cfg, images, device, run.batch, run.encoder, run.model.uses_local, run.channels_last)
    for i, (v, lv) in enumerate(views.epoch(0, run.steps)):
        assert v[0].shape[-1] == 16  # trained at ssl.view_size
        loss, _ = run.step(v, lv, i, views.rows)
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.encoder.parameters()))
    emb = run.embed(images[:64])
    assert emb.shape == (64, run.encoder.dim) and np.isfinite(emb).all()
