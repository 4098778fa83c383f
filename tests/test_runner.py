"""The stage runner: skip unchanged stages, resume interrupted ones, wipe stale outputs."""
import pytest

from src import io
from src.config import Config
from src.errors import UserError
from src.stages import Stage, run_stage


def make_cfg(tmp_path) -> Config:
    cfg = Config()
    cfg.run.root = str(tmp_path / "runs")
    cfg.run.name = "t"
    cfg.run.device = "cpu"
    return cfg


class CountingStage:
    """A training-like stage of 5 steps that checkpoints after each step and can be interrupted."""

    def __init__(self, key="ssl", interrupt_at=None, after=()):
        self.calls, self.steps_run, self.interrupt_at = 0, [], interrupt_at
        self.stage = Stage(key=key, title="count", sections=("ssl",), run=self.run, after=after)

    def run(self, cfg, paths):
        self.calls += 1
        ckpt = paths.checkpoint_dir(self.stage.key) / "step.json"
        start = io.read_json(ckpt)["step"] if ckpt.exists() else 0
        for step in range(start, 5):
            if step == self.interrupt_at:
                self.interrupt_at = None
                raise KeyboardInterrupt
            self.steps_run.append(step)
            io.write_json(ckpt, {"step": step + 1})
        io.write_text(paths.stage(self.stage.key) / "out.txt", "ok")
        return {"steps": 5}


def test_skips_unchanged_stage(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    s = CountingStage()
    assert run_stage(s.stage, cfg) == {"steps": 5}
    assert run_stage(s.stage, cfg) == {"steps": 5}
    assert s.calls == 1
    assert "unchanged" in capsys.readouterr().out
    stage_dir = tmp_path / "runs" / "t" / "01_ssl"
    for name in ("config.yaml", "meta.json", "_done.json", "out.txt"):
        assert (stage_dir / name).exists(), name
    meta = io.read_json(stage_dir / "meta.json")
    assert meta["seed"] == cfg.run.seed and "commit" in meta and meta["fingerprint"]


def test_reruns_when_its_section_changes_but_not_others(tmp_path):
    cfg = make_cfg(tmp_path)
    s = CountingStage()
    run_stage(s.stage, cfg)
    cfg.heads.knn_k = 3  # not a section this stage reads
    run_stage(s.stage, cfg)
    assert s.calls == 1
    cfg.ssl.epochs = 7
    run_stage(s.stage, cfg)
    assert s.calls == 2 and s.steps_run == [0, 1, 2, 3, 4] * 2  # stale checkpoint wiped: from zero


def test_resumes_interrupted_stage_from_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path)
    s = CountingStage(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(s.stage, cfg)
    assert not (tmp_path / "runs" / "t" / "01_ssl" / "_done.json").exists()
    run_stage(s.stage, cfg)
    assert s.steps_run == [0, 1, 2, 3, 4]  # steps 0-2 were not redone


def test_downstream_reruns_when_upstream_changes(tmp_path):
    cfg = make_cfg(tmp_path)
    up = CountingStage(key="ssl")
    down = CountingStage(key="pseudo", after=("ssl",))
    down.stage.sections = ("pseudo",)
    run_stage(up.stage, cfg)
    run_stage(down.stage, cfg)
    run_stage(down.stage, cfg)
    assert down.calls == 1
    cfg.ssl.epochs = 2
    run_stage(up.stage, cfg)
    run_stage(down.stage, cfg)
    assert down.calls == 2


def test_missing_upstream_is_a_user_error(tmp_path):
    cfg = make_cfg(tmp_path)
    down = CountingStage(key="pseudo", after=("ssl",))
    with pytest.raises(UserError, match="needs 01_ssl first"):
        run_stage(down.stage, cfg)
    assert not (tmp_path / "runs" / "t" / "02_pseudo").exists()


def test_force_reruns(tmp_path):
    cfg = make_cfg(tmp_path)
    s = CountingStage()
    run_stage(s.stage, cfg)
    run_stage(s.stage, cfg, force=True)
    assert s.calls == 2


def test_optional_stages_are_those_the_submission_can_do_without():
    from src.config import OPTIONAL_STAGES
    from src.paths import STAGE_DIRS
    from src.pipeline_bench import needed_stages

    assert set(OPTIONAL_STAGES) == set(STAGE_DIRS) - needed_stages()


def test_skip_stages_leaves_out_a_stage_and_removes_its_old_outputs(tmp_path, monkeypatch, capsys):
    """run_all with run.skip_stages: the stage does not run, its earlier outputs are removed, and the
    stage after it no longer fingerprints it (so it reruns on what is left)."""
    import runpy

    from conftest import REPO
    from src.config import load_config

    monkeypatch.syspath_prepend(str(REPO / "pipelines"))
    run_all = runpy.run_path(str(REPO / "pipelines" / "run_all.py"))  # module globals; __main__ block not run
    cfg = make_cfg(tmp_path)
    up = CountingStage(key="metric")
    down = CountingStage(key="heads")
    down.stage.optional_after = ("metric",)
    down.stage.sections = ("heads",)
    stages = [up.stage, down.stage]
    monkeypatch.setitem(run_all["main"].__globals__, "all_stages", lambda: stages)
    run_all["main"](cfg)
    assert (up.calls, down.calls) == (1, 1)
    metric_dir = tmp_path / "runs" / "t" / "03_metric"
    assert (metric_dir / "out.txt").exists()
    cfg.run.skip_stages = ["metric"]
    run_all["main"](cfg)
    assert (up.calls, down.calls) == (1, 2)  # metric left out; heads reran without it
    assert not metric_dir.exists()
    assert "[03_metric] left out (run.skip_stages)" in capsys.readouterr().out
    run_all["main"](cfg)
    assert down.calls == 2  # unchanged now
    with pytest.raises(UserError, match=r"run\.skip_stages: 'heads' cannot be skipped"):
        load_config(None, ["run.skip_stages=[heads]"])
