"""`python pipelines/bench.py pipeline -c CONFIG`: every stage from a clean run directory, measured.

Each numbered stage script runs in its own child process (``python pipelines/NN_stage.py -c CONFIG
... run.name=RUN``), so its numbers are its own:

* wall seconds: the child's whole life (imports and CUDA start-up included), timed here, and its
  CPU seconds (user + system, from the same rusage);
* peak RSS: ``ru_maxrss`` of that one child, read with ``os.wait4`` on its pid (the kernel's
  high-water mark of the child and the grandchildren it waited for, e.g. DataLoader workers).
  RUSAGE_CHILDREN would give the maximum over *all* children so far, not this stage's;
* peak GPU memory (CUDA): ``torch.cuda.max_memory_allocated`` of the stage, which the runner
  writes to ``pipeline.jsonl`` / ``_done.json``; beside it the estimate of src.costs;
* SSL: augmented views/s of the last epoch (01_ssl summary) x FLOPs per view (counted with
  FlopCounterMode on the meta device, src.costs) = achieved GFLOP/s, and its share of the matmul
  roof measured at the end (an n x n torch.mm in the step's dtype: bf16 under autocast, else fp32);
* at the end: the submission's accuracy estimate and LOO (its sidecar) and its public-truth accuracy, scored from
  the CSV with src.submission.score when data.truth is set.

With bench.ssl_probe_steps > 0 the SSL epochs are fitted to the time budget before 01_ssl runs:
``bench.py ssl`` times that many training steps in a child process beside 00_prepare (GPU work
beside a CPU-bound stage: it costs no wall time there), and the stages from 01_ssl on get
``ssl.epochs = floor(0.9 x (stage_budget_s.ssl - ssl_overhead_s) / epoch seconds)``, between 1 and
ssl_max_epochs (or ssl.epochs). The 0.9 leaves room for what steady-state steps do not show
(per-epoch syncs, the first epoch's cuDNN autotuning). The fit is kept in ssl_fit.json for --resume.

Results: ``runs/<RUN>/bench.json`` (rewritten after every stage, so a run killed by a deadline
keeps what it measured) and ``runs/<RUN>/bench.md`` (a RESULTS-ready section). RUN defaults to
``<run.name>_bench``; the run directory and that run's submissions are deleted first unless
``--resume`` (then unchanged stages are skipped and an interrupted one resumes, as in run_all).
Exit status: that of the first failing stage; 1 when a stage's GPU peak exceeds
bench.max_gpu_memory_gb; 124 when stopped by SIGTERM (a deadline); else 0. With --deadline-s an
optional stage (02-04) that fails is set aside (``<stage>.failed``) and the needed stages still run
and submit; the exit status is still that stage's.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from src import io
from src.config import Config, load_config
from src.cv import format_interval
from src.paths import STAGE_DIRS, RunPaths
from src.runtime import REPO_ROOT, git_commit, machine_info, resolve_device

MB = 2**20


class Stopped(Exception):
    """SIGTERM (a deadline such as scripts/gpu_run.sh's `timeout`) while a stage ran."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="", help="run name (default: <run.name>_bench)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the run directory: skip unchanged stages, resume an interrupted one")
    parser.add_argument("--no-roof", action="store_true", help="skip the matmul roof measurement")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="seconds from the start by which the pipeline must end: an optional stage (one the "
                             "submission does not need) is skipped when its budget and the budgets of the needed "
                             "stages after it would pass the deadline, and one that fails is set aside so the "
                             "submission is still made")


def needed_stages() -> set[str]:
    """Stages the submission cannot do without: the last stage and, transitively, its `after`
    (02_pseudo, 03_metric and 04_meta are only `optional_after` of what follows them)."""
    from src.stages import get_stage

    last = list(STAGE_DIRS)[-1]
    needed, todo = set(), [last]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo.extend(get_stage(key).after)
    return needed


def skip_reason(key: str, elapsed: float, deadline: float, budgets: dict[str, float], needed: set[str],
                skipped: list[str]) -> str | None:
    """Why an optional stage is skipped now (None: run it). Budgets are bench.stage_budget_s."""
    from src.stages import get_stage

    if key in needed:
        return None
    missing = [up for up in get_stage(key).after if up in skipped]
    if missing:
        return f"needs {', '.join(STAGE_DIRS[m] for m in missing)}, which was skipped"
    keys = list(STAGE_DIRS)
    later_needed = [k for k in keys[keys.index(key) + 1:] if k in needed]
    need = budgets.get(key, 0.0) + sum(budgets.get(k, 0.0) for k in later_needed)
    if deadline and elapsed + need > deadline:
        return (f"deadline: {elapsed:.0f} s + {need:.0f} s of budgets ({STAGE_DIRS[key]} and "
                f"{', '.join(STAGE_DIRS[k] for k in later_needed)}) > {deadline:.0f} s")
    return None


def stage_command(stage_dir: str, config: str | None, overrides: list[str], run: str) -> list[str]:
    cmd = [sys.executable, str(REPO_ROOT / "pipelines" / f"{stage_dir}.py")]
    if config:
        cmd += ["-c", config]
    return cmd + list(overrides) + [f"run.name={run}"]


def run_child(cmd: list[str]) -> tuple[int, float, float, float]:
    """(exit status, wall seconds, peak RSS MiB, CPU seconds: user + system) of one child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd())
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.terminate()  # the deadline stops the stage too (timeout also signals the whole group)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
    return (proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024,  # ru_maxrss: KiB on Linux
            usage.ru_utime + usage.ru_stime)


def start_ssl_probe(cfg: Config, args: argparse.Namespace, overrides: list[str], run: str,
                    paths: RunPaths) -> subprocess.Popen:
    steps = cfg.bench.ssl_probe_steps
    cmd = [sys.executable, str(REPO_ROOT / "pipelines" / "bench.py"), "ssl", *(["-c", args.config] if args.config else []),
           *overrides, f"run.name={run}", "--steps", str(steps), "--warmup", str(max(3, steps // 3)),
           "--augment", "config", "--out", str(paths.run / "ssl_probe.jsonl")]
    log = open(paths.run / "ssl_probe.log", "w")
    print(f"bench: timing {steps} SSL steps beside 00_prepare (log {paths.run / 'ssl_probe.log'})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    return proc


def set_aside(paths: RunPaths, key: str) -> Path:
    """Move a failed stage's folder to <folder>.failed: later stages no longer see it (05_heads falls
    back to the embeddings before it), its logs stay for the post-mortem."""
    folder = paths.stage(key)
    kept = folder.with_name(folder.name + ".failed")
    shutil.rmtree(kept, ignore_errors=True)
    if folder.exists():
        folder.rename(kept)
    return kept


def fit_ssl_epochs(cfg: Config, paths: RunPaths, probe: subprocess.Popen) -> dict:
    """Wait for the probe; the epochs that fit stage_budget_s.ssl at its seconds per step."""
    from src.train_utils import steps_per_epoch

    _, status, usage = os.wait4(probe.pid, 0)
    probe.returncode = os.waitstatus_to_exitcode(status)
    fit: dict = {"config_epochs": cfg.ssl.epochs, "epochs": cfg.ssl.epochs, "probe_returncode": probe.returncode,
                 "probe_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    out = paths.run / "ssl_probe.jsonl"
    if probe.returncode != 0 or not out.exists() or not paths.images.exists():
        fit["error"] = f"probe exit {probe.returncode} (see {paths.run / 'ssl_probe.log'}): ssl.epochs unchanged"
        print(f"warning: {fit['error']}", flush=True)
        return fit
    m = io.read_jsonl(out)[-1]
    fit["probe"] = {k: m.get(k) for k in ("train_views_per_s", "seconds_per_step", "flops_per_view", "achieved_gflops",
                                         "roof_pct", "roof", "peak_memory_mb", "augment_gpu_views_per_s",
                                         "augment_cpu_views_per_s", "steps", "warmup")}
    n = len(io.read_npy(paths.images, mmap=True))
    steps = steps_per_epoch(n, cfg.ssl.batch_size, 1, cfg.ssl.max_steps_per_epoch)
    epoch_s = steps * m["seconds_per_step"]
    available = cfg.bench.stage_budget_s["ssl"] - cfg.bench.ssl_overhead_s
    cap = cfg.bench.ssl_max_epochs or cfg.ssl.epochs
    epochs = max(1, min(cap, math.floor(0.9 * available / epoch_s)))
    fit.update({"images": n, "steps_per_epoch": steps, "epoch_s": round(epoch_s, 2), "available_s": available,
                "cap": cap, "epochs": epochs})
    print(f"bench: ssl.epochs={epochs} fits {available:.0f} s at {m['train_views_per_s']:,.0f} views/s "
          f"({epoch_s:.2f} s per epoch of {steps} steps; config {cfg.ssl.epochs}, cap {cap})", flush=True)
    return fit


def _count_ssl(cfg: Config) -> dict:
    from src.costs import gpu_memory_estimate, ssl_step_costs

    try:
        costs = ssl_step_costs(cfg)
        estimate = gpu_memory_estimate(cfg)
    except Exception as exc:  # a measurement aid must not cost the run it measures (the device time)
        print(f"warning: FLOP / memory count failed ({exc.__class__.__name__}: {exc})", flush=True)
        return {"error": f"{exc.__class__.__name__}: {exc}"}
    costs.pop("flops_by_op", None)
    return {**costs, "gpu_estimate_mb": {k: round(v["bytes"] / MB) for k, v in estimate.items()}}


def _done_record(paths: RunPaths, key: str) -> dict:
    marker = paths.done_marker(key)
    return io.read_json(marker) if marker.exists() else {}


def _submission(cfg: Config, paths: RunPaths) -> dict:
    from src.submission import score

    sub = paths.submission("ensemble")
    if not sub.exists():
        return {"path": None}
    out: dict = {"path": str(sub)}
    sidecar = sub.with_suffix(".json")
    if sidecar.exists():
        side = io.read_json(sidecar)
        ens = side.get("ensemble_cv") or {}
        est = ens.get("estimate") or {}
        out.update({"method": side.get("method"), "local_cv": ens.get("accuracy"), "local_cv_interval": ens.get("interval"),
                    "local_cv_n": ens.get("n"), "estimate": est.get("estimate"),
                    "estimate_interval": est.get("interval"), "estimator": ens.get("estimator")})
    if cfg.data.truth and Path(cfg.data.truth).exists():
        result = score(sub, cfg.data.truth)
        out.update({"truth_file": cfg.data.truth, "truth_accuracy": result["accuracy"], "truth_n": result["n"]})
    return out


def bench_pipeline(cfg: Config, args: argparse.Namespace) -> dict:
    run = args.run or f"{cfg.run.name}_bench"
    overrides = [o for o in args.overrides if not o.startswith("run.name=")]
    cfg = load_config(args.config, [*overrides, f"run.name={run}"])  # bad values: exit 2 before any work
    paths = RunPaths(cfg)
    device = resolve_device(cfg.run.device)
    if not args.resume:
        if paths.run.exists():
            print(f"bench: removing {paths.run} (a clean run; --resume keeps it)", flush=True)
            shutil.rmtree(paths.run)
        for old in paths.submissions.glob(f"{run}__*"):
            old.unlink()
    paths.run.mkdir(parents=True, exist_ok=True)
    command = "python pipelines/bench.py pipeline " + " ".join(
        shlex.quote(a) for a in ([*(["-c", args.config] if args.config else []), *args.overrides]
                                 + (["--run", args.run] if args.run else []) + (["--resume"] if args.resume else [])))
    result: dict = {"bench": "pipeline", "config": args.config, "overrides": overrides, "run": run,
                    "run_dir": str(paths.run), "command": command, "commit": git_commit(),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "device": str(device), "budget": {"stages_s": dict(cfg.bench.stage_budget_s),
                                                       "total_s": cfg.bench.budget_s,
                                                       "max_gpu_memory_gb": cfg.bench.max_gpu_memory_gb},
                    "stages": [], "status": "running"}
    result["ssl_costs"] = _count_ssl(cfg)
    json_path, md_path = paths.run / "bench.json", paths.run / "bench.md"
    io.write_json(json_path, result)

    def on_term(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, on_term)
    code = 0
    t_start = time.perf_counter()
    fit_file = paths.run / "ssl_fit.json"
    probe = None
    if cfg.bench.ssl_probe_steps and args.resume and fit_file.exists():
        result["ssl_fit"] = io.read_json(fit_file)
        overrides = [*overrides, f"ssl.epochs={result['ssl_fit']['epochs']}"]
    elif cfg.bench.ssl_probe_steps:
        probe = start_ssl_probe(cfg, args, overrides, run, paths)
    needed = needed_stages() if args.deadline_s else set(STAGE_DIRS)
    skipped: list[str] = []
    failed: list[str] = []  # optional stages that failed under a deadline
    try:
        for key, dirname in STAGE_DIRS.items():
            if key in cfg.run.skip_stages:
                from src.stages import get_stage, skip_stage

                skip_stage(get_stage(key), cfg)  # removes its old outputs
                reason = "run.skip_stages"
            else:
                reason = skip_reason(key, time.perf_counter() - t_start, args.deadline_s, cfg.bench.stage_budget_s,
                                     needed, skipped)
            if reason:
                print(f"bench: skipping {dirname} ({reason})", flush=True)
                skipped.append(key)
                result["stages"].append({"stage": dirname, "key": key, "status": "skipped", "reason": reason,
                                         "budget_s": cfg.bench.stage_budget_s.get(key)})
                io.write_json(json_path, result)
                continue
            if probe is not None and key == "ssl":
                result["ssl_fit"] = fit_ssl_epochs(cfg, paths, probe)
                probe = None
                io.write_json(fit_file, result["ssl_fit"])
                overrides = [*overrides, f"ssl.epochs={result['ssl_fit']['epochs']}"]
                result["overrides"] = overrides
                io.write_json(json_path, result)
            print(f"bench: stage {dirname}", flush=True)
            row = {"stage": dirname, "key": key, "budget_s": cfg.bench.stage_budget_s.get(key)}
            result["stages"].append(row)
            started = time.perf_counter()
            try:
                rc, wall, rss, cpu = run_child(stage_command(dirname, args.config, overrides, run))
            except Stopped:
                row.update({"status": "stopped", "wall_s": round(time.perf_counter() - started, 1)})
                result["status"] = f"stopped during {dirname}"
                code = 124
                break
            row.update({"returncode": rc, "wall_s": round(wall, 2), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss, 1)})
            record = _done_record(paths, key)
            if record:
                row["stage_s"] = record.get("seconds")
                if device.type == "cuda":
                    row["peak_gpu_mb"] = record.get("peak_memory_mb")
                estimate = (result["ssl_costs"].get("gpu_estimate_mb") or {}).get(key)
                if estimate is not None and device.type == "cuda":
                    row["gpu_estimate_mb"] = estimate
            row["status"] = "ok" if rc == 0 else "failed"
            io.write_json(json_path, result)
            if rc != 0 and args.deadline_s and key not in needed:
                # under a deadline a failed optional stage costs itself, not the submission
                kept = set_aside(paths, key)
                print(f"bench: {dirname} failed (exit {rc}); going on without it (its files: {kept})", flush=True)
                skipped.append(key)
                failed.append(dirname)
                code = code or rc
                continue
            if rc != 0:
                result["status"] = f"failed in {dirname} (exit {rc})"
                code = rc
                break
        else:
            result["status"] = f"ok without {', '.join(failed)} (failed)" if failed else "ok"
    except Stopped:  # while waiting for the probe
        result["status"] = "stopped before 01_ssl"
        code = 124
    finally:
        if probe is not None and probe.poll() is None:
            probe.terminate()
            probe.wait()
        signal.signal(signal.SIGTERM, previous)
        result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        finish(cfg, paths, result, device, roof=not args.no_roof and code == 0)
        io.write_json(json_path, result)
        io.write_text(md_path, markdown(result))
    print(table(result), flush=True)
    print(f"bench: {json_path} and {md_path}", flush=True)
    if code == 0 and result.get("memory_over"):
        code = 1
    if code:
        sys.exit(code)
    return result


def finish(cfg: Config, paths: RunPaths, result: dict, device, roof: bool) -> None:
    """SSL throughput and GFLOP/s, memory cap, budget fit and the submission's scores."""
    ssl = _done_record(paths, "ssl").get("summary") or {}
    costs = result.get("ssl_costs") or {}
    out: dict = {"views_per_s": ssl.get("views_per_s"), "train_seconds": ssl.get("train_seconds"),
                 "epochs": ssl.get("epochs"), "flops_per_view": costs.get("flops_per_view")}
    if roof:
        from src.costs import matmul_roof, ssl_step_dtype

        out["roof"] = matmul_roof(device, cfg.bench.roof_size, dtype=ssl_step_dtype(cfg, device))
    from src.costs import achieved

    out.update(achieved(out["flops_per_view"], out["views_per_s"], (out.get("roof") or {}).get("gflops")))
    # the embedding passes: all of 01_ssl's work when ssl.epochs is 0. FLOPs per pass: the mean over the
    # main encoder and ssl.extra_encoders (embed_passes_per_s counts the passes of all of them)
    if ssl.get("embed_passes_per_s"):
        from src.costs import embed_flops

        try:
            flops = embed_flops(cfg)
        except Exception as exc:  # noqa: BLE001 - a counting failure must not lose the measurement
            print(f"warning: embedding FLOP count failed ({type(exc).__name__}: {exc})")
            flops = None
        out.update({"embed_passes_per_s": ssl["embed_passes_per_s"], "embed_seconds": ssl.get("embed_seconds"),
                    "flops_per_embed_pass": flops,
                    "embed_gflops": round(flops * ssl["embed_passes_per_s"] / 1e9, 1) if flops else None})
    result["skipped"] = [r["stage"] for r in result["stages"] if r.get("status") == "skipped"]
    ssl_row = next((r for r in result["stages"] if r["key"] == "ssl" and r.get("status") == "ok"), None)
    budget = cfg.bench.stage_budget_s.get("ssl")
    if ssl_row and budget and out["train_seconds"] and out["epochs"]:
        overhead = ssl_row["wall_s"] - out["train_seconds"]  # start-up, probes, embeddings
        out["epochs_for_budget"] = max(0, math.floor(out["epochs"] * (budget - overhead) / out["train_seconds"]))
    result["ssl"] = out
    cap = cfg.bench.max_gpu_memory_gb
    peaks = [r.get("peak_gpu_mb") for r in result["stages"] if r.get("peak_gpu_mb") is not None]
    if peaks:
        result["peak_gpu_mb"] = max(peaks)
        if cap:
            result["memory_over"] = max(peaks) * MB > cap * 1e9
    total_budget = cfg.bench.budget_s or sum(cfg.bench.stage_budget_s.values())
    if total_budget:
        result["within_budget"] = result.get("total_wall_s", 0) <= total_budget and result["status"] == "ok"
    result["submission"] = _submission(cfg, paths) if result["status"].startswith("ok") else {"path": None}
    result["machine"] = machine_info(device)


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _rows(result: dict) -> list[list[str]]:
    cuda = result["device"].startswith("cuda")
    header = ["stage", "wall s", "budget s", "stage s", "CPU s", "peak RSS MiB"] + (
        ["peak GPU MiB", "GPU est. MiB"] if cuda else [])
    rows = [header]
    for r in result["stages"]:
        over = r.get("budget_s") is not None and r.get("wall_s") is not None and r["wall_s"] > r["budget_s"]
        line = [r["stage"] + ("" if r.get("status") == "ok" else f" ({r.get('status')})"),
                _fmt(r.get("wall_s")) + (" OVER" if over else ""), _fmt(r.get("budget_s"), ".0f"),
                _fmt(r.get("stage_s")), _fmt(r.get("cpu_s")), _fmt(r.get("peak_rss_mb"), ",.0f")]
        if cuda:
            line += [_fmt(r.get("peak_gpu_mb"), ",.0f"), _fmt(r.get("gpu_estimate_mb"), ",.0f")]
        rows.append(line)
    budgets = [r["budget_s"] for r in result["stages"] if r.get("budget_s")]
    total = ["total", _fmt(result.get("total_wall_s")), _fmt(result["budget"]["total_s"] or (sum(budgets) or None), ".0f"),
             "", _fmt(sum(r.get("cpu_s") or 0 for r in result["stages"])),
             _fmt(max([r.get("peak_rss_mb") or 0 for r in result["stages"]] or [0]), ",.0f")]
    rows.append(total + (["", ""] if cuda else []))
    return rows


def _summary_lines(result: dict) -> list[str]:
    lines = []
    ssl = result.get("ssl") or {}
    roof = ssl.get("roof") or {}
    if ssl.get("views_per_s"):
        fpv = ssl.get("flops_per_view")
        text = f"SSL: {ssl['views_per_s']:,.0f} augmented views/s (last epoch)"
        if fpv:
            text += f"; {fpv / 1e9:.3f} GFLOP per view (FlopCounterMode, forward + backward)"
        if ssl.get("achieved_gflops") is not None:
            text += f"; achieved {ssl['achieved_gflops']:,.1f} GFLOP/s"
        if roof:
            text += (f" = {ssl['roof_pct']:.1f} % of the measured matmul roof ({roof['gflops']:,.0f} GFLOP/s, "
                     f"{roof['n']}x{roof['n']} {roof['dtype']}, {roof['threads']} threads)")
        if ssl.get("epochs_for_budget") is not None:
            text += f"; epochs that fit the ssl budget at this speed: {ssl['epochs_for_budget']} (ran {ssl['epochs']})"
        lines.append(text)
    elif ssl.get("epochs") == 0:
        lines.append("SSL: no training (ssl.epochs 0)")
    elif (result.get("ssl_costs") or {}).get("flops_per_view"):
        lines.append(f"SSL: {result['ssl_costs']['flops_per_view'] / 1e9:.3f} GFLOP per view (counted); no views/s")
    if ssl.get("embed_passes_per_s"):
        text = f"Embedding: {ssl['embed_passes_per_s']:,.1f} encoder passes/s ({ssl['embed_seconds']} s)"
        if ssl.get("embed_gflops"):
            text += (f"; {ssl['flops_per_embed_pass'] / 1e9:.3f} GFLOP per pass (counted, forward) = "
                     f"{ssl['embed_gflops']:,.1f} GFLOP/s")
        lines.append(text)
    sub = result.get("submission") or {}
    if sub.get("path"):
        text = f"Submission {sub['path']}"
        if sub.get("method"):
            text += f" (ensemble:{sub['method']})"
        if sub.get("estimate") is not None:
            interval = sub.get("estimate_interval") or [float("nan")] * 2
            text += f": estimated accuracy {format_interval(sub['estimate'], interval)} ({sub.get('estimator')})"
        if sub.get("local_cv") is not None:
            interval = sub.get("local_cv_interval") or [float("nan")] * 2
            text += (", LOO" if sub.get("estimate") is not None else ": local CV")
            text += f" {format_interval(sub['local_cv'], interval)} (n = {sub.get('local_cv_n')})"
        if sub.get("truth_accuracy") is not None:
            text += f"; public-truth accuracy **{sub['truth_accuracy']:.4f}** ({sub['truth_n']:,} images of {sub['truth_file']})"
        lines.append(text)
    else:
        lines.append("No submission (the pipeline did not finish).")
    if result.get("peak_gpu_mb") is not None:
        cap = result["budget"]["max_gpu_memory_gb"]
        lines.append(f"Peak GPU memory (max_memory_allocated, any stage): {result['peak_gpu_mb']:,.0f} MiB"
                     + (f" against a cap of {cap} GB: {'OVER' if result.get('memory_over') else 'within'}" if cap else ""))
    if "within_budget" in result:
        lines.append(f"Whole pipeline {result.get('total_wall_s')} s: "
                     + ("within" if result["within_budget"] else "NOT within") + " the budget")
    fit = result.get("ssl_fit")
    if fit:
        probe = fit.get("probe") or {}
        if "error" in fit:
            lines.append(f"SSL epochs not fitted: {fit['error']}")
        else:
            lines.append(f"SSL probe ({probe.get('steps')} steps, bench.py ssl): {probe['train_views_per_s']:,.0f} views/s, "
                         f"{probe['seconds_per_step'] * 1000:.1f} ms/step, {probe['achieved_gflops']:,.1f} GFLOP/s = "
                         f"{probe['roof_pct']:.1f} % of the matmul roof; ssl.epochs fitted to {fit['epochs']} "
                         f"({fit['epoch_s']} s/epoch into {fit['available_s']:.0f} s; config {fit['config_epochs']}, "
                         f"cap {fit['cap']})")
    for r in result["stages"]:
        if r.get("status") == "skipped":
            lines.append(f"Skipped {r['stage']}: {r['reason']}")
    lines.append(f"Status: {result['status']}")
    return lines


def table(result: dict) -> str:
    rows = _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + [""] + _summary_lines(result))


def markdown(result: dict) -> str:
    m = result.get("machine") or {}
    where = m.get("gpu") or f"CPU ({m.get('cpus')} cores)"
    lines = [f"### `bench.py pipeline`: {result.get('config') or 'defaults'} on {where}", "",
             "```", result["command"], "```", "",
             f"Date {result['date']}; commit `{result['commit']}`; torch {m.get('torch')}, Python {m.get('python')}, "
             f"{m.get('cpus')} CPUs, host `{m.get('host')}`; run directory `{result['run_dir']}`.", ""]
    rows = _rows(result)
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join(" --- " for _ in rows[0]) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines += [f"* {line}" for line in _summary_lines(result)]
    return "\n".join(lines) + "\n"
