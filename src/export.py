"""What a device run brings back, within the device tool's return limits.

The device machine returns at most 8 files from $OUT, each at most 16 MiB and 64 MiB together,
no more than 2 folders down, named in letters, digits, '.', '_' and '-'. :func:`pack_outputs`
writes, flat in one folder and in this order of priority:

    bench.json           the bench result (src.pipeline_bench)
    summary.md           its RESULTS-ready markdown section
    submission.csv       the ensemble submission (its sidecar, with local CV, is in run.tar.gz)
    encoder-K-of-N.safetensors  the chosen stage's encoder in fp16 shards of <= 15 MiB each
                         (a ResNet-18: 11.2 M weights, 22 MB in fp16: 2 shards); the encoder spec
                         (encoder.json) and the original dtypes ride in each shard's metadata
    run.tar.gz           the run's small text files (JSON, logs, configs, CSVs) and plots, capped

Files already in the folder (scripts/gpu_run.sh's log.txt) count towards the limits; the lowest
priorities are dropped, with a message, when the limits would be passed.

    python pipelines/pack.py out -c CONFIG run.name=RUN --out DIR   # the above
    python pipelines/pack.py join DIR runs/RUN/01_ssl               # shards -> encoder.safetensors + .json
"""
from __future__ import annotations

import io as _io
import json
import re
import shutil
import tarfile
from pathlib import Path

import torch

from src import io
from src.config import Config
from src.errors import UserError
from src.paths import ENCODER_STAGES, RunPaths

MIB = 2**20
MAX_FILES = 8
MAX_FILE_BYTES = 16 * MIB
MAX_TOTAL_BYTES = 64 * MIB
SHARD_BYTES = 15 * MIB  # under the 16 MiB limit with room for the header and metadata
FP16_MAX = 65504.0
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
SHARD_NAME = re.compile(r"^encoder-(\d+)-of-(\d+)\.safetensors$")
TAR_SUFFIXES = (".json", ".jsonl", ".yaml", ".md", ".txt", ".csv", ".png", ".html")
TAR_MAX_MEMBER = 4 * MIB  # raw size of one member; bigger (labels of 60k images...) stay behind


def _half(t: torch.Tensor) -> torch.Tensor:
    """fp16 where it is exact enough and in range; anything else (ints, huge values) unchanged."""
    if not t.is_floating_point() or t.dtype == torch.float16:
        return t
    if t.numel() and (not torch.isfinite(t).all() or t.abs().max() > FP16_MAX):
        return t
    return t.to(torch.float16)


def write_encoder_shards(weights: Path, spec: Path, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Encoder weights as fp16 safetensors shards of <= shard_bytes of tensor data each."""
    state = io.load_tensors(weights)
    spec_text = json.dumps(io.read_json(spec)) if spec.exists() else "{}"
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        t = _half(tensor)
        n = t.numel() * t.element_size()
        if n > shard_bytes:
            raise UserError(f"{weights}: tensor '{name}' is {n / MIB:.1f} MiB, over the {shard_bytes / MIB:.0f} MiB "
                            "shard size (split it or return the encoder another way)")
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    paths = []
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"encoder-{i}-of-{len(shards)}.safetensors"
        meta = {"spec": spec_text, "dtypes": json.dumps({k: dtypes[k] for k in shard}), "source": str(weights)}
        io.save_tensors(path, shard, metadata=meta)
        paths.append(path)
    return paths


def join_encoder_shards(shard_dir: Path, target_dir: Path) -> tuple[Path, Path]:
    """Shards in shard_dir -> target_dir/encoder.safetensors (original dtypes; values rounded to
    fp16 on the way) + target_dir/encoder.json, loadable by src.models.encoder.load_encoder or as
    backbone.pretrained."""
    from safetensors import safe_open

    found = sorted((int(m[1]), int(m[2]), p) for p in Path(shard_dir).iterdir() if (m := SHARD_NAME.match(p.name)))
    if not found:
        raise UserError(f"{shard_dir}: no encoder-K-of-N.safetensors shards")
    n = found[0][1]
    if [k for k, _, _ in found] != list(range(1, n + 1)) or any(m != n for _, m, _ in found):
        raise UserError(f"{shard_dir}: incomplete shards {[p.name for _, _, p in found]} (expected 1..{n} of {n})")
    state, spec = {}, {}
    for _, _, path in found:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            dtypes = json.loads(meta.get("dtypes", "{}"))
            spec = json.loads(meta.get("spec", "{}")) or spec
            for name in f.keys():
                t = f.get_tensor(name)
                state[name] = t.to(getattr(torch, dtypes.get(name, str(t.dtype).replace("torch.", ""))))
    target_dir = Path(target_dir)
    weights, spec_path = target_dir / "encoder.safetensors", target_dir / "encoder.json"
    io.save_tensors(weights, state)
    io.write_json(spec_path, spec)
    return weights, spec_path


def _tar_members(cfg: Config, paths: RunPaths) -> list[Path]:
    """Small files of the run, most useful first: JSON / logs / configs, then CSVs, then plots."""
    files = [p for p in sorted(paths.run.rglob("*")) if p.is_file() and p.suffix in TAR_SUFFIXES
             and "ckpt" not in p.parts and p.stat().st_size <= TAR_MAX_MEMBER]
    sub = paths.submission("ensemble").with_suffix(".json")
    files += [sub] if sub.exists() else []
    rank = {s: i for i, s in enumerate(TAR_SUFFIXES)}
    return sorted(files, key=lambda p: (rank[p.suffix] >= rank[".csv"], rank[p.suffix] >= rank[".png"], str(p)))


def write_run_tar(cfg: Config, paths: RunPaths, target: Path, limit: int) -> Path | None:
    """run.tar.gz of _tar_members, adding members while the compressed archive stays under limit."""
    members = _tar_members(cfg, paths)
    if not members:
        return None
    keep = len(members)
    while keep:
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in members[:keep]:
                arcname = str(p.relative_to(paths.run)) if paths.run in p.parents else f"submissions/{p.name}"
                tar.add(p, arcname=arcname)
        if buf.tell() <= limit:
            with io.atomic_path(target, suffix=".tar.gz") as tmp:
                tmp.write_bytes(buf.getvalue())
            return target
        keep = keep * 3 // 4  # drop the least useful quarter and try again
    return None


def check_out_dir(out_dir: Path) -> list[str]:
    """Problems of out_dir against the return limits (empty: it all comes back)."""
    problems, files, total = [], [], 0
    for p in sorted(Path(out_dir).rglob("*")):
        rel = p.relative_to(out_dir)
        if any(not NAME_OK.match(part) for part in rel.parts):
            problems.append(f"{rel}: name outside letters, digits, '.', '_', '-'")
        if p.is_file():
            files.append(rel)
            total += p.stat().st_size
            if len(rel.parts) > 3:
                problems.append(f"{rel}: more than 2 folders down")
            if p.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{rel}: {p.stat().st_size / MIB:.1f} MiB, over 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, over {MAX_FILES}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / MIB:.1f} MiB together, over 64 MiB")
    return problems


def pack_outputs(cfg: Config, out_dir: Path, encoder_stage: str = "auto") -> dict:
    """Write what exists of the run into out_dir within the limits; returns {name: bytes} and the
    list of what is missing or was dropped."""
    paths = RunPaths(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out_dir.iterdir() if p.is_file()]
    budget_files = MAX_FILES - len(existing)
    budget_bytes = MAX_TOTAL_BYTES - sum(p.stat().st_size for p in existing)
    written: dict[str, int] = {}
    notes: list[str] = []

    def room(n_files: int, n_bytes: int, what: str) -> bool:
        if n_files > budget_files or n_bytes > budget_bytes:
            notes.append(f"dropped {what}: over the return limits ({budget_files} files / "
                         f"{budget_bytes / MIB:.1f} MiB left)")
            return False
        return True

    def put(src: Path, name: str) -> None:
        nonlocal budget_files, budget_bytes
        if not src.exists():
            notes.append(f"missing {src}")
            return
        size = src.stat().st_size
        if size > MAX_FILE_BYTES:
            notes.append(f"dropped {src}: {size / MIB:.1f} MiB, over 16 MiB")
            return
        if room(1, size, str(src)):
            shutil.copyfile(src, out_dir / name)
            written[name] = size
            budget_files -= 1
            budget_bytes -= size

    put(paths.run / "bench.json", "bench.json")
    put(paths.run / "bench.md", "summary.md")
    sub = paths.submission("ensemble")
    put(sub, "submission.csv")
    if encoder_stage == "auto":  # the latest encoder: what the submission's embeddings came from
        encoder_stage = next((k for k in ENCODER_STAGES if paths.encoder(k).exists()), "ssl")
    weights = paths.encoder(encoder_stage)
    if weights.exists():
        staging = out_dir / ".shards"  # dot-folder: removed below, never returned
        staging.mkdir(exist_ok=True)
        shards = write_encoder_shards(weights, paths.encoder_spec(encoder_stage), staging)
        sizes = [p.stat().st_size for p in shards]
        if room(len(shards), sum(sizes), f"the {encoder_stage} encoder ({len(shards)} shards)"):
            for p, size in zip(shards, sizes):
                p.replace(out_dir / p.name)
                written[p.name] = size
            budget_files -= len(shards)
            budget_bytes -= sum(sizes)
        for p in staging.iterdir():
            p.unlink()
        staging.rmdir()
    else:
        notes.append(f"missing {weights}")
    if budget_files >= 1 and paths.run.exists():
        tar = write_run_tar(cfg, paths, out_dir / "run.tar.gz", min(MAX_FILE_BYTES, budget_bytes))
        if tar is not None:
            written[tar.name] = tar.stat().st_size
    problems = check_out_dir(out_dir)
    return {"written": written, "notes": notes, "problems": problems}
