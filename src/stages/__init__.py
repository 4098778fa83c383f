"""Stage definitions and the runner that skips unchanged stages and resumes interrupted ones.

A stage reads only what earlier stages wrote (``after``) and is fingerprinted by the config
sections it reads plus the fingerprints of its upstream stages. The runner:

* skips a stage whose ``_done.json`` carries the current fingerprint;
* wipes a stage directory whose fingerprint differs (config or upstream changed);
* keeps the directory of an interrupted stage with the same fingerprint, so the stage's own
  checkpoint logic resumes where it stopped;
* saves ``config.yaml`` and ``meta.json`` (seed, commit, fingerprint) beside the outputs.
"""
from __future__ import annotations

import hashlib
import importlib
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from src import io
from src.config import Config, for_stage, to_yaml
from src.errors import UserError
from src.paths import STAGE_DIRS, RunPaths
from src.runtime import git_commit, machine_info, peak_memory_mb, resolve_device, seed_everything

# Pipeline order. A stage appears here only once it exists (never a stub).
STAGE_MODULES: dict[str, str] = {
    "prepare": "src.stages.prepare",
    "ssl": "src.stages.ssl",
    "pseudo": "src.stages.pseudo",
    "metric": "src.stages.metric",
    "meta": "src.stages.meta",
    "heads": "src.stages.heads",
    "submit": "src.stages.submit",
}


@dataclass
class Stage:
    key: str  # one of src.paths.STAGE_DIRS
    title: str
    sections: tuple[str, ...]  # config sections whose values change this stage's outputs
    run: Callable[[Config, RunPaths], dict]  # returns a JSON-serialisable summary
    after: tuple[str, ...] = ()  # upstream stages that must be done
    optional_after: tuple[str, ...] = ()  # upstream stages used when they ran (fingerprinted)
    lr_find: Callable[[Config, RunPaths], dict] | None = None
    # the config checks types alone cannot make; run first, so a bad key is reported before a missing
    # upstream stage and before any work
    validate: Callable[[Config], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return STAGE_DIRS[self.key]


def get_stage(key: str) -> Stage:
    if key not in STAGE_MODULES:
        raise UserError(f"unknown stage '{key}' (known: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[key]).STAGE


def all_stages() -> list[Stage]:
    return [get_stage(k) for k in STAGE_MODULES]


def fingerprint(stage: Stage, cfg: Config, paths: RunPaths) -> str:
    parts = [stage.key, cfg.section_hash(*stage.sections), str(cfg.run.seed)]
    for up in (*stage.after, *stage.optional_after):
        marker = paths.done_marker(up)
        if marker.exists():
            parts.append(f"{up}:{io.read_json(marker)['fingerprint']}")
        elif up in stage.after:
            raise UserError(
                f"{marker}: stage {STAGE_DIRS[stage.key]} needs {STAGE_DIRS[up]} first "
                f"(run pipelines/run_all.py or the {STAGE_DIRS[up]} stage)")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def is_done(stage: Stage, cfg: Config, paths: RunPaths) -> bool:
    marker = paths.done_marker(stage.key)
    try:
        return marker.exists() and io.read_json(marker)["fingerprint"] == fingerprint(stage, cfg, paths)
    except UserError:
        return False


def skip_stage(stage: Stage, cfg: Config) -> None:
    """Leave out an optional stage (run.skip_stages): remove any earlier outputs of it, so no later
    stage reads them and their fingerprints no longer include it."""
    stage_dir = RunPaths(cfg).stage(stage.key)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    print(f"[{stage.dirname}] left out (run.skip_stages)")


def validate_stage(stage: Stage, cfg: Config) -> None:
    """The stage's config checks (Stage.validate): before its upstream check and any work."""
    if stage.validate is not None:
        stage.validate(for_stage(cfg, stage.key))


def run_stage(stage: Stage, cfg: Config, force: bool = False, lr_find: bool = False) -> dict:
    validate_stage(stage, cfg)
    paths = RunPaths(cfg)
    fp = fingerprint(stage, cfg, paths)
    stage_dir = paths.stage(stage.key)
    marker = paths.done_marker(stage.key)
    if lr_find:
        if stage.lr_find is None:
            raise UserError(f"stage {stage.dirname} has no --lr-find (only training stages do)")
        seed_everything(cfg.run.seed)
        return stage.lr_find(for_stage(cfg, stage.key), paths)
    if not force and marker.exists() and io.read_json(marker)["fingerprint"] == fp:
        print(f"[{stage.dirname}] unchanged (fingerprint {fp}): skipped")
        return io.read_json(marker)["summary"]
    fp_file = paths.fingerprint_file(stage.key)
    if stage_dir.exists() and (force or not fp_file.exists() or fp_file.read_text().strip() != fp):
        shutil.rmtree(stage_dir)  # stale outputs of another config: never mix them
    resumed = stage_dir.exists()
    stage_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(fp_file, fp + "\n")
    io.write_text(stage_dir / "config.yaml", to_yaml(cfg))
    device = resolve_device(cfg.run.device)
    meta = {"stage": stage.dirname, "fingerprint": fp, "seed": cfg.run.seed, "commit": git_commit(),
            "config_hash": cfg.hash(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed": resumed, "device": str(device), "machine": machine_info(device)}
    io.write_json(stage_dir / "meta.json", meta)
    print(f"[{stage.dirname}] {stage.title}" + (" (resuming)" if resumed else ""))
    seed_everything(cfg.run.seed)
    t0 = time.perf_counter()
    summary = stage.run(for_stage(cfg, stage.key), paths) or {}
    seconds = time.perf_counter() - t0
    record = {"fingerprint": fp, "seconds": round(seconds, 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
    io.write_json(marker, record)
    io.append_jsonl(paths.run / "pipeline.jsonl", {"stage": stage.dirname, **record})
    print(f"[{stage.dirname}] done in {seconds:.1f}s")
    return summary
