"""`python pipelines/bench.py extract -c CONFIG`: feature-extraction throughput of the config's encoder.

    python pipelines/bench.py extract -c configs/cifar_cpu_pretrained.yaml \\
        --sizes 96,128,160,192,224 --batches 8,16,32,64 --seconds 3

The encoder is ``Encoder(cfg.backbone, cfg.data.image_size, size)`` for each input size of --sizes
(it resizes the 32x32 images to size x size inside its forward, bilinear), with random weights
(``backbone.pretrained`` is ignored: speed does not depend on the weights), frozen and in eval mode.
Each batch is B random uint8 images, normalised once by :func:`to_input`; what is timed is the
encoder call on that batch (resize included). Engines:

* ``torch``: eager fp32, NCHW. ``torch_nhwc``: eager fp32, channels_last model and input.
* ``torch_bf16``: channels_last under bf16 autocast; on a CPU without native bf16 (no amx_bf16 or
  avx512_bf16) it is still measured and marked "emulated".
* ``compile``: ``torch.compile`` of the channels_last fp32 model (static shapes); the first call
  (compilation) is reported as setup seconds; a failure (e.g. no C++ compiler) is recorded in its row.
* ``onnxruntime``: the encoder exported once per size to ONNX (torch's dynamo exporter, or the
  TorchScript one at opset 17 when that fails; dynamic batch axis), run by ONNX Runtime's CPU
  provider with torch's thread count and every graph optimisation.
* ``openvino`` / ``openvino_bf16``: the same ONNX file converted by OpenVINO, reshaped to the batch
  and compiled for the CPU (LATENCY hint, torch's thread count) with inference precision f32 /
  bf16; the row reports the precision OpenVINO actually chose.

ONNX Runtime and OpenVINO are CPU-only here (skipped on CUDA); a missing package (see
requirements-bench.txt) gives a "not installed" row. Every row checks its features against eager
fp32 NCHW on the same batch (max abs diff). Timing: --warmup untimed batches, then batches until
--seconds have passed (time.perf_counter; CUDA events on CUDA). FLOPs per image are counted
(src.costs.count_flops: 2 x the MACs of every convolution and matrix product of one forward at that
size), so GFLOP/s = FLOPs per image x images/s / 1e9. Writes the rows as JSON to --out (default
runs/<run.name>/bench_extract.json) and prints a markdown table with each engine's images/s relative
to torch_nhwc at the same size and batch, and the fastest engine and batch per size.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from src import io
from src.config import Config
from src.costs import flops_per_image, shapes_only
from src.errors import UserError
from src.models.encoder import Encoder, to_input
from src.models.onnx_engine import cpu_session, export_onnx, short_error
from src.paths import RunPaths
from src.runtime import cpu_has_native_bf16, machine_info, resolve_device, seed_everything, sync

# engine -> (input layout, precision, packages it needs beyond torch: requirements-bench.txt)
ENGINES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch": ("NCHW", "fp32", ()),
    "torch_nhwc": ("NHWC", "fp32", ()),
    "torch_bf16": ("NHWC", "bf16", ()),
    "compile": ("NHWC", "fp32", ()),
    "onnxruntime": ("NCHW", "fp32", ("onnx", "onnxruntime")),
    "openvino": ("NCHW", "fp32", ("onnx", "openvino")),
    "openvino_bf16": ("NCHW", "bf16", ("onnx", "openvino")),
}
DEFAULT_ENGINES = "torch,torch_nhwc,torch_bf16,compile,onnxruntime,openvino,openvino_bf16"
REFERENCE = "torch_nhwc"  # the ratio column divides by this engine's images/s


@dataclasses.dataclass
class Runner:
    """One engine made ready for one size and batch: `step` runs the timed batch, `output` gives its
    features as float32 numpy (for the check against eager fp32)."""

    step: Callable[[], Any]
    output: Callable[[], np.ndarray]
    setup_s: float | None = None  # seconds to get ready (compile, export, session); None: eager, nothing to do
    precision: str = ""
    note: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="96,128,160,192,224",
                        help="input sides the encoder resizes to, comma-separated")
    parser.add_argument("--batches", default="8,16,32,64", help="batch sizes, comma-separated")
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of: {', '.join(ENGINES)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine, size and batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--out", default="", help="JSON file (default runs/<run.name>/bench_extract.json)")


def parse_ints(text: str, flag: str) -> list[int]:
    """'96,128' -> [96, 128]; anything but positive integers is a UserError naming the flag."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item.isdigit() or int(item) <= 0:
            raise UserError(f"{flag}: '{item}' is not a positive integer (e.g. {flag} 96,128)")
        values.append(int(item))
    return values


def parse_engines(text: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise UserError(f"--engines: unknown engine '{unknown[0] if unknown else text}' (known: {', '.join(ENGINES)})")
    return names


def build_encoder(cfg: Config, size: int, device: torch.device) -> nn.Module:
    """The config's encoder at input side `size`, random weights (same seed), frozen, eval mode."""
    seed_everything(cfg.run.seed)
    return Encoder(shapes_only(cfg.backbone), cfg.data.image_size, size).to(device).eval().requires_grad_(False)


def time_batches(step: Callable[[], Any], device: torch.device, seconds: float, warmup: int = 2) -> tuple[int, float]:
    """(batches, seconds): `warmup` untimed calls, then calls until `seconds` have passed (at least one)."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0, n = time.perf_counter(), 0
    while True:
        step()
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    if cuda:
        end.record()
        end.synchronize()
        return n, start.elapsed_time(end) / 1000
    return n, time.perf_counter() - t0


def _channels_last_copy(model: nn.Module) -> nn.Module:
    with torch.inference_mode(False):  # ordinary parameters, not inference tensors (torch.compile traces them)
        return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _numpy(out: torch.Tensor) -> np.ndarray:
    return out.float().cpu().numpy()


def _cached(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
    """make() once per key; a failure is remembered and raised again (not retried) for that key."""
    if key not in cache:
        try:
            cache[key] = (True, make())
        except Exception as exc:  # noqa: BLE001 - re-raised below, recorded in the engine's row
            cache[key] = (False, exc)
    ok, value = cache[key]
    if not ok:
        raise value
    return value


def make_runner(engine: str, model: nn.Module, x: torch.Tensor, cache: dict, tmp: Path) -> Runner:
    """`engine` ready to run `model` on the normalised NCHW batch `x`; `cache` holds what is shared
    between the batches of one size (the channels_last copy, the compiled module, the ONNX file...)."""
    device = x.device
    if engine == "torch":
        return Runner(lambda: model(x), lambda: _numpy(model(x)))
    nhwc = _cached(cache, "nhwc", lambda: _channels_last_copy(model))
    xc = x.contiguous(memory_format=torch.channels_last)
    if engine == "torch_nhwc":
        return Runner(lambda: nhwc(xc), lambda: _numpy(nhwc(xc)))
    if engine == "torch_bf16":
        def bf16() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return nhwc(xc)
        emulated = device.type == "cpu" and not cpu_has_native_bf16()
        return Runner(bf16, lambda: _numpy(bf16()), note="emulated: no native bf16" if emulated else "")
    if engine == "compile":
        compiled = _cached(cache, "compile", lambda: torch.compile(nhwc, dynamic=False))
        t0 = time.perf_counter()
        compiled(xc)  # compiles for this batch size
        sync(device)
        return Runner(lambda: compiled(xc), lambda: _numpy(compiled(xc)), setup_s=time.perf_counter() - t0)

    onnx_path = tmp / f"encoder_{x.shape[-1]}_to_{getattr(model, 'input_size', 0)}.onnx"
    onnx_file = _cached(cache, "onnx", lambda: export_onnx(model, x.shape[-1], onnx_path))
    xn = x.cpu().numpy()
    threads = torch.get_num_threads()
    note = f"{onnx_file['exporter']} exporter, opset {onnx_file['opset']}"
    if engine == "onnxruntime":

        def session() -> tuple[Any, float]:
            t0 = time.perf_counter()
            return cpu_session(onnx_file["path"], threads), time.perf_counter() - t0

        sess, session_s = _cached(cache, "ort", session)
        feed = {sess.get_inputs()[0].name: xn}
        return Runner(lambda: sess.run(None, feed)[0], lambda: sess.run(None, feed)[0],
                      setup_s=onnx_file["seconds"] + session_s, note=note)

    import openvino as ov

    t0 = time.perf_counter()
    core = _cached(cache, "ov_core", ov.Core)
    ov_model = ov.convert_model(str(onnx_file["path"]))
    ov_model.reshape({ov_model.inputs[0].any_name: list(xn.shape)})  # static shapes: OpenVINO's fast path
    wanted = "bf16" if engine == "openvino_bf16" else "f32"  # explicit: OpenVINO defaults to bf16 on AMX CPUs
    compiled_ov = core.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                       "INFERENCE_PRECISION_HINT": wanted})
    request = compiled_ov.create_infer_request()
    hint = compiled_ov.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO chose on this CPU
    actual = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(hint.get_type_name(), hint.get_type_name())
    if actual != ENGINES[engine][1]:
        note += f"; asked {ENGINES[engine][1]}, OpenVINO ran {actual}"

    def infer() -> np.ndarray:
        request.infer([xn])
        return request.get_output_tensor(0).data

    return Runner(infer, lambda: np.array(infer()), setup_s=onnx_file["seconds"] + time.perf_counter() - t0,
                  precision=actual, note=note)


def bench_extract(cfg: Config, args: argparse.Namespace) -> dict:
    """Every engine x size x batch of the arguments: rows, the best per size, the table; writes the JSON."""
    sizes = parse_ints(args.sizes, "--sizes")
    batches = parse_ints(args.batches, "--batches")
    engines = parse_engines(args.engines)
    if not args.seconds > 0:
        raise UserError("--seconds: must be positive")
    if args.warmup < 0:
        raise UserError("--warmup: must be >= 0")
    device = resolve_device(cfg.run.device)
    out_path = Path(args.out) if args.out else RunPaths(cfg).run / "bench_extract.json"
    threads = torch.get_num_threads()
    s = cfg.data.image_size
    rng = np.random.default_rng(cfg.run.seed)
    images = torch.from_numpy(rng.integers(0, 256, (max(batches), s, s, 3), dtype=np.uint8))
    machine = machine_info(device)
    result: dict[str, Any] = {
        "bench": "extract", "device": str(device), "machine": machine,
        "native_bf16": machine["cpu"]["native_bf16"], "threads": threads, "backbone": dataclasses.asdict(cfg.backbone),
        "image_size": s, "sizes": sizes, "batches": batches, "engines": engines, "seconds": args.seconds,
        "warmup": args.warmup, "flops_per_image": {}, "rows": []}
    rows: list[dict] = result["rows"]
    missing = {e: [p for p in ENGINES[e][2] if importlib.util.find_spec(p) is None] for e in engines}
    for engine in engines:
        if missing[engine]:
            rows.append(_row(engine, None, None, status="not installed", note=f"{', '.join(missing[engine])}: "
                             "pip install -r requirements-bench.txt -c requirements.txt"))
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        for size in sizes:
            model = build_encoder(cfg, size, device)
            flops = flops_per_image(model, s, device)
            result["flops_per_image"][str(size)] = flops
            cache: dict = {}
            for batch in batches:
                with torch.inference_mode():
                    x = to_input(images[:batch].to(device))
                    reference = _numpy(model(x))
                for engine in engines:
                    if missing[engine]:
                        continue
                    if ENGINES[engine][2] and device.type != "cpu":
                        rows.append(_row(engine, size, batch, status="skipped: CPU-only engine", flops=flops))
                        continue
                    rows.append(_measure(engine, model, x, reference, flops, cache, Path(tmp), args, size, batch))
                    print(_line(rows[-1]), flush=True)
            del model, cache
    _ratios(rows)
    result["best"] = _best(rows, sizes)
    print(table(result))
    io.write_json(out_path, result)
    print(f"wrote {out_path}")
    return result


def _row(engine: str, size: int | None, batch: int | None, status: str = "ok", flops: int | None = None,
         note: str = "") -> dict:
    layout, precision, _ = ENGINES[engine]
    return {"engine": engine, "layout": layout, "precision": precision, "size": size, "batch": batch, "status": status,
            "flops_per_image": flops, "images_per_s": None, "gflops": None, "ms_per_batch": None, "batches_timed": 0,
            "seconds": None, "setup_s": None, "max_abs_diff": None, "vs_" + REFERENCE: None, "note": note}


def _measure(engine: str, model: nn.Module, x: torch.Tensor, reference: np.ndarray, flops: int, cache: dict,
             tmp: Path, args: argparse.Namespace, size: int, batch: int) -> dict:
    row = _row(engine, size, batch, flops=flops)
    try:
        with torch.inference_mode():
            runner = make_runner(engine, model, x, cache, tmp)
            row["max_abs_diff"] = float(np.abs(np.asarray(runner.output(), np.float32) - reference).max())
            n, seconds = time_batches(runner.step, x.device, args.seconds, args.warmup)
    except Exception as exc:  # noqa: BLE001 - one engine failing (no compiler, export) must not stop the others
        row["status"] = f"error: {short_error(exc)}"
        return row
    ips = n * batch / seconds
    row.update({"images_per_s": ips, "gflops": flops * ips / 1e9, "ms_per_batch": 1000 * seconds / n,
                "batches_timed": n, "seconds": seconds, "setup_s": runner.setup_s,
                "precision": runner.precision or row["precision"], "note": runner.note})
    return row


def _ratios(rows: list[dict]) -> None:
    ref = {(r["size"], r["batch"]): r["images_per_s"] for r in rows if r["engine"] == REFERENCE and r["images_per_s"]}
    for r in rows:
        base = ref.get((r["size"], r["batch"]))
        if r["images_per_s"] and base:
            r["vs_" + REFERENCE] = r["images_per_s"] / base


def _best(rows: list[dict], sizes: list[int]) -> dict:
    best = {}
    for size in sizes:
        ok = [r for r in rows if r["size"] == size and r["images_per_s"]]
        if ok:
            r = max(ok, key=lambda r: r["images_per_s"])
            best[str(size)] = {k: r[k] for k in ("engine", "layout", "precision", "batch", "images_per_s", "gflops",
                                                 "vs_" + REFERENCE)}
    return best


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(r: dict) -> str:
    return (f"  {r['engine']} size {r['size']} batch {r['batch']}: {_fmt(r['images_per_s'], ',.1f')} images/s "
            f"{r['status'] if r['status'] != 'ok' else ''}").rstrip()


def table(result: dict) -> str:
    """The markdown report: machine line, one row per engine x size x batch, the best per size."""
    b = result["backbone"]
    flops = ", ".join(f"{k}: {v / 1e9:.3f}" for k, v in result["flops_per_image"].items())
    gpu = f"{result['machine']['gpu']}, host CPU " if "gpu" in result["machine"] else ""
    lines = [f"Feature extraction, {b['name']} (random weights, eval, no grad) on {result['device']}: "
             f"{gpu}{result['machine']['cpu']['name']}, {result['threads']} torch threads, native bf16: "
             f"{'yes' if result['native_bf16'] else 'no'}; {result['seconds']:g} s per row",
             f"GFLOP per image (counted, by input size): {flops}", "",
             f"| engine | layout | precision | size | batch | images/s | GFLOP/s | ms/batch | vs {REFERENCE} "
             "| max abs diff | setup s | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['engine']} | {r['layout']} | {r['precision']} | {r['size'] or '-'} | {r['batch'] or '-'} | "
                     f"{_fmt(r['images_per_s'], ',.1f')} | {_fmt(r['gflops'], ',.1f')} | "
                     f"{_fmt(r['ms_per_batch'], '.2f')} | "
                     f"{_fmt(r['vs_' + REFERENCE], '.2f')} | {_fmt(r['max_abs_diff'], '.2e')} | "
                     f"{_fmt(r['setup_s'], '.2f')} | {status.replace('|', '/')} |")
    lines.append("")
    for size, r in result["best"].items():
        ratio = f", {r['vs_' + REFERENCE]:.2f}x {REFERENCE}" if r["vs_" + REFERENCE] else ""
        lines.append(f"best at {size}: {r['engine']} ({r['layout']} {r['precision']}) batch {r['batch']}: "
                     f"{r['images_per_s']:,.1f} images/s, {r['gflops']:,.1f} GFLOP/s{ratio}")
    return "\n".join(lines)
