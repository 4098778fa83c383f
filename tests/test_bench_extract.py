"""`bench.py extract`: the CLI on a tiny encoder (rows, counted GFLOP/s, ratios, default JSON path),
FLOPs against input size, argument errors, a failing or missing engine, and the exported ONNX
encoder's features against torch's (ONNX Runtime, OpenVINO; skipped where not installed)."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from src.config import load_config
from src.models import bench_extract
from src.models.bench_extract import build_encoder, flops_per_image, make_runner, time_batches
from src.models.encoder import to_input
from tests.conftest import run_script

CPU = torch.device("cpu")
TINY = ["run.device=cpu", "backbone.width=4", "backbone.stem_width=8"]
FAST = ["--seconds", "0.05", "--warmup", "1"]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_cli_rows_gflops_and_ratios(capsys, tmp_path):
    res = run_script("bench.py", "extract", *TINY, f"run.root={tmp_path}", "run.name=tiny", "--sizes", "32,48",
                     "--batches", "2,4", "--engines", "torch,torch_nhwc", *FAST, capsys=capsys)
    code, err = res
    assert code == 0, err
    result = json.loads((tmp_path / "tiny" / "bench_extract.json").read_text())  # the default --out
    rows = result["rows"]
    assert [(r["engine"], r["size"], r["batch"]) for r in rows] == [
        (e, s, b) for s in (32, 48) for b in (2, 4) for e in ("torch", "torch_nhwc")]
    nhwc = {(r["size"], r["batch"]): r["images_per_s"] for r in rows if r["engine"] == "torch_nhwc"}
    for r in rows:
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["batches_timed"] >= 1, r
        assert r["flops_per_image"] == result["flops_per_image"][str(r["size"])] > 0
        assert r["gflops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e9, rel=1e-9)
        assert r["images_per_s"] == pytest.approx(r["batch"] * r["batches_timed"] / r["seconds"], rel=1e-9)
        assert r["vs_torch_nhwc"] == pytest.approx(r["images_per_s"] / nhwc[(r["size"], r["batch"])], rel=1e-9)
        assert r["max_abs_diff"] < 1e-4  # both eager fp32: the same features up to summation order
        assert (r["layout"], r["precision"]) == {"torch": ("NCHW", "fp32"), "torch_nhwc": ("NHWC", "fp32")}[r["engine"]]
    for size in ("32", "48"):  # the best row of each size is its fastest
        best = max((r for r in rows if str(r["size"]) == size), key=lambda r: r["images_per_s"])
        assert result["best"][size]["engine"] == best["engine"] and result["best"][size]["batch"] == best["batch"]
    assert result["threads"] == torch.get_num_threads() and isinstance(result["native_bf16"], bool)
    table = res.out  # the markdown table: header, one line per row, the best per size
    assert "| engine | layout | precision | size | batch | images/s | GFLOP/s | ms/batch | vs torch_nhwc |" in table
    assert f"{torch.get_num_threads()} torch threads" in table and "native bf16: " in table
    assert sum(line.startswith("| torch") for line in table.splitlines()) == len(rows)
    assert "best at 32: " in table and "best at 48: " in table


def test_flops_grow_with_input_area():
    cfg = load_config(None, TINY)
    small, large = (flops_per_image(build_encoder(cfg, s, CPU), 32, CPU) for s in (32, 64))
    assert small > 0 and large / small == pytest.approx((64 / 32) ** 2, rel=0.2)


def test_time_batches_counts_only_timed_calls():
    calls = []
    n, seconds = time_batches(lambda: calls.append(1), CPU, 0.01, warmup=2)
    assert n >= 1 and len(calls) == n + 2 and seconds >= 0.01


@pytest.mark.parametrize("args, message", [
    (["--engines", "torch,tensorrt"], "--engines: unknown engine 'tensorrt'"),
    (["--sizes", "96,abc"], "--sizes: 'abc' is not a positive integer"),
    (["--sizes", "0"], "--sizes: '0' is not a positive integer"),
    (["--batches", "8,"], "--batches: '' is not a positive integer"),
    (["--seconds", "0"], "--seconds: must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, args, message):
    code, err = run_script("bench.py", "extract", *TINY, f"run.root={tmp_path}", *args, capsys=capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.strip().count("\n") == 0, err
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


def test_failing_and_missing_engines_are_rows(monkeypatch, capsys, tmp_path):
    def no_compiler(model, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: no C++ compiler found\nlong traceback")
        return fail

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    code, err = run_script("bench.py", "extract", *TINY, "--sizes", "32", "--batches", "2",
                           "--engines", "compile,openvino,torch_nhwc", *FAST, "--out", str(tmp_path / "x.json"),
                           capsys=capsys)
    assert code == 0, err
    rows = {r["engine"]: r for r in json.loads((tmp_path / "x.json").read_text())["rows"]}
    assert rows["compile"]["status"] == "error: RuntimeError: InductorError: no C++ compiler found"
    assert rows["compile"]["images_per_s"] is None
    assert rows["openvino"]["status"] == "not installed" and rows["openvino"]["size"] is None
    assert rows["torch_nhwc"]["status"] == "ok" and rows["torch_nhwc"]["images_per_s"] > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny encoder at input side 48 and the engines' shared per-size cache (one ONNX export)."""
    pytest.importorskip("onnx")
    cfg = load_config(None, TINY)
    return build_encoder(cfg, 48, CPU), {}, tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_exported_engines_match_torch(exported, engine):
    pytest.importorskip(engine)
    model, cache, tmp = exported
    threads = torch.get_num_threads()
    for batch in (3, 5):  # the export's example batch is 2: the batch axis is dynamic
        with torch.inference_mode():
            x = to_input(_images(batch, seed=batch))
            reference = model(x).numpy()
            runner = make_runner(engine, model, x, cache, tmp)
            out = np.asarray(runner.output())
        assert out.shape == reference.shape == (batch, model.dim)
        assert np.abs(out - reference).max() < 1e-3
        assert runner.setup_s > 0 and runner.precision in ("", "fp32")
    assert torch.get_num_threads() == threads
    assert bench_extract.ENGINES[engine][:2] == ("NCHW", "fp32")
