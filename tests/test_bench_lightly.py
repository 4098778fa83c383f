"""`bench.py lightly`: the equal-wall-time loop and LR schedule (no lightly needed), the error
without lightly, and (when lightly is installed, see requirements-bench.txt) both sides end to end
on a tiny digits competition with matched transforms and identical initial encoders."""
import sys

import numpy as np
import pytest
import torch

from src import io
from src.config import load_config
from src.ssl.bench_lightly import SCHEDULE_POINTS, schedule_index, train_for, wall_time_schedule
from src.stages import get_stage, run_stage
from tests.conftest import run_script

CPU = torch.device("cpu")


class FakeClock:
    """Each call returns the current time; each step advances it by `step_s`."""

    def __init__(self, step_s):
        self.now, self.step_s = 100.0, step_s

    def __call__(self):
        return self.now


def test_train_for_stops_after_the_step_that_crosses_the_budget():
    clock = FakeClock(0.3)
    fractions = []

    def step(batch, fraction):
        fractions.append(fraction)
        clock.now += clock.step_s

    out = train_for(1.0, iter(range(10**6)), step, CPU, warmup_steps=2, clock=clock)
    # steps end at 0.3, 0.6, 0.9, 1.2 s: the fourth crosses 1 s and is the last
    assert out["steps"] == 4 and fractions == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert out["seconds"] == pytest.approx(1.2)
    assert out["timed_steps"] == 2 and out["timed_seconds"] == pytest.approx(0.6)  # after the 2 warm-up steps


def test_train_for_counts_batch_fetching_and_keeps_short_runs():
    clock = FakeClock(0.0)

    def batches():  # a slow loader: 0.4 s per batch, free steps
        while True:
            clock.now += 0.4
            yield None

    out = train_for(1.0, batches(), lambda b, f: None, CPU, warmup_steps=5, clock=clock)
    assert out["steps"] == 3 and out["seconds"] == pytest.approx(1.2)
    # fewer steps than the warm-up: the whole run is timed
    assert out["timed_steps"] == 3 and out["timed_seconds"] == pytest.approx(1.2)
    clock.now = 0.0
    one = train_for(0.01, iter([1, 2, 3]), lambda b, f: setattr(clock, "now", clock.now + 1), CPU, clock=clock)
    assert one["steps"] == 1  # at least one step, even past the budget


def test_wall_time_schedule_follows_the_config_shape():
    cfg = load_config(None, ["ssl.epochs=10", "ssl.warmup_epochs=2", "ssl.min_lr_ratio=0.1"])
    lrs = wall_time_schedule(cfg, 0.5)
    assert lrs.shape == (SCHEDULE_POINTS,)
    assert lrs[0] == 0.0 and lrs[SCHEDULE_POINTS // 5] == pytest.approx(0.5)  # warm-up: first 2/10 of the budget
    assert np.all(np.diff(lrs[SCHEDULE_POINTS // 5:]) <= 0) and lrs[-1] == pytest.approx(0.05, rel=1e-3)
    assert schedule_index(0.0) == 0 and schedule_index(0.5) == SCHEDULE_POINTS // 2
    assert schedule_index(1.0) == SCHEDULE_POINTS - 1


def test_errors_before_any_work(monkeypatch, capsys, tmp_path):
    code, err = run_script("bench.py", "lightly", f"run.root={tmp_path}", "--seconds", "0", capsys=capsys)
    assert code == 2 and "--seconds: must be positive" in err
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly -> ImportError
    code, err = run_script("bench.py", "lightly", f"run.root={tmp_path}", capsys=capsys)
    assert code == 2 and "lightly is not installed" in err and "requirements-bench.txt" in err
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------
# With lightly
# ---------------------------------------------------------------------------------------------
def _overrides(root):
    return [f"run.root={root}/runs", "run.name=lb", "run.progress=false", "run.device=cpu", "run.num_workers=0",
            f"data.path={root}/digits", "data.builder=digits", f"data.truth={root}/truth.csv",
            "data.demo_test_size=100", "backbone.width=4", "backbone.stem_width=8", "backbone.small_stem=false",
            "ssl.batch_size=32", "ssl.proj_hidden=32", "ssl.proj_dim=16", "ssl.embed_batch_size=512",
            "ssl.optimizer=adamw", "ssl.lr=0.01", "ssl.epochs=10", "ssl.warmup_epochs=1", "ssl.solarize_p=0.2",
            "ssl.crop_scale_min=0.5", "ssl.flip=false", "ssl.color_jitter=0.3"]


def test_lightly_transform_and_models_match_ours(tmp_path):
    pytest.importorskip("lightly")
    from torchvision.transforms import v2

    from src.ssl.bench_lightly import LightlySide, lightly_transform, simclr_cfg, unmatched_settings
    from src.ssl.trainer import SSLRun

    cfg = load_config(None, _overrides(tmp_path))
    assert any("solarize" in n for n in unmatched_settings(cfg))
    ops = {type(t).__name__: t for t in lightly_transform(cfg).transforms[0].transform.transforms}
    assert tuple(ops["RandomResizedCrop"].scale) == (0.5, 1.0) and ops["RandomHorizontalFlip"].p == 0.0
    jitter = ops["RandomApply"].transforms[0]
    assert isinstance(jitter, v2.ColorJitter) and jitter.brightness == pytest.approx((0.7, 1.3))
    assert jitter.hue == pytest.approx((-0.075, 0.075)) and ops["RandomApply"].p == 0.8
    cfg = simclr_cfg(cfg)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(cfg.run.seed)
    ours = SSLRun(cfg, len(images), CPU)
    torch.manual_seed(cfg.run.seed)
    theirs = LightlySide(cfg, images, CPU, ours.base_lr)
    a, b = ours.encoder.state_dict(), theirs.encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same starting encoder
    (x0, x1), _ = next(iter(theirs.loader))
    assert x0.shape == x1.shape == (32, 3, 32, 32) and not torch.equal(x0, x1)


def test_bench_runs_both_sides_on_digits(tmp_path, capsys):
    pytest.importorskip("lightly")
    overrides = _overrides(tmp_path)
    run_stage(get_stage("prepare"), load_config(None, overrides))
    out = tmp_path / "bench.jsonl"
    result = run_script("bench.py", "lightly", *overrides, "--seconds", "1", "--warmup", "1", "--out", str(out),
                        capsys=capsys)
    assert result[0] == 0, result[1]
    assert "ours / lightly views/s" in result.out and "note: ssl.solarize_p=0.2" in result.out
    record = io.read_jsonl(out)[-1]
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == ["untrained", "lightly", "ours"]
    for method in ("lightly", "ours"):
        r = rows[method]
        assert r["steps"] >= 1 and r["views_per_s"] > 0 and r["seconds"] >= 1.0
        assert 0 <= r["knn_loo_labeled"] <= 1 and 0 <= r["knn_5fold_truth"] <= 1
    assert record["views_per_s_ratio"] == pytest.approx(rows["ours"]["views_per_s"] / rows["lightly"]["views_per_s"],
                                                        abs=0.01)
    assert record["batch_size"] == 32 and record["budget_s"] == 1.0 and record["notes"]
