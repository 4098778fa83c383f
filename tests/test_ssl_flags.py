"""CPU-recipe switches of stage 01 (each test fails if its flag were ignored) and the label-free
RankMe signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.config import load_config
from src.errors import UserError
from src.probe import rankme
from src.ssl.trainer import SSLRun, validate
from src.runtime import use_channels_last
from src.ssl.views import DeviceViews, make_views


def _cfg(*extra):
    return load_config(None, ["run.device=cpu", "backbone.width=4", "backbone.stem_width=8", "ssl.batch_size=8",
                              "ssl.proj_hidden=16", "ssl.proj_dim=8", "ssl.epochs=1", *extra])


def test_rankme_counts_the_directions_the_embeddings_use():
    rng = np.random.default_rng(0)
    assert rankme(rng.normal(size=(4000, 16))) > 15.5  # isotropic: all 16 directions
    two = rng.normal(size=(4000, 2)) @ rng.normal(size=(2, 16))
    assert 1.5 < rankme(two) < 2.05  # rank-2 data
    assert rankme(np.ones((100, 16)) + 1e-9 * rng.normal(size=(100, 16))) < 1.01  # collapsed


@pytest.mark.parametrize("width, requested, expected", [(16, True, True), (16, False, False), (4, True, False)])
def test_channels_last_on_cpu_follows_the_flag_and_skips_tiny_networks(width, requested, expected):
    """NHWC on the CPU where asked, except for networks with convolutions reading < 16 channels (the
    width-4 test networks), whose NHWC backward corrupts the heap in torch 2.14 (src.runtime)."""
    cfg = _cfg(f"run.channels_last={str(requested).lower()}", f"backbone.width={width}", f"backbone.stem_width={width}")
    run = SSLRun(cfg, 64, torch.device("cpu"))
    assert run.channels_last == expected
    conv = [m for m in run.model.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == expected
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    views, _ = next(make_views(cfg, images, torch.device("cpu"), 8, run.encoder, False, run.channels_last).epoch(0, 1))
    assert views[0].is_contiguous(memory_format=torch.channels_last) == expected
    assert views[0].is_contiguous() != expected
    assert use_channels_last(requested, torch.device("cuda"), run.encoder) == requested  # no guard on CUDA


def test_view_size_sets_the_training_resolution_only():
    cfg = _cfg("ssl.view_size=16")
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    views, _ = next(DeviceViews(cfg, images, torch.device("cpu"), 8, 0, 16).epoch(0, 1))
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2
    run = SSLRun(cfg, 64, torch.device("cpu"))
    assert run.embed(images[:5]).shape == (5, run.encoder.dim)  # embeddings read the full 32x32 images
    views, _ = next(DeviceViews(_cfg(), images, torch.device("cpu"), 8, 0, 16).epoch(0, 1))
    assert views[0].shape[-1] == 32  # 0: the image size


@pytest.mark.parametrize("value", [-1, 33])
def test_view_size_out_of_range_is_a_config_error(value):
    with pytest.raises(UserError, match=r"ssl.view_size: must be in 0..data.image_size"):
        validate(_cfg(f"ssl.view_size={value}"))


def test_cpu_bf16_autocast_follows_the_flag_and_the_cpu(tmp_path):
    """autocast on the CPU only with cpu=True and run.precision bf16; auto reads the CPU's bf16 flags."""
    from src.runtime import autocast, resolve_cpu_bf16

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    for precision, on, dtype in (("bf16", True, torch.bfloat16), ("bf16", False, torch.float32),
                                 ("fp32", True, torch.float32)):
        with autocast(cpu, precision, cpu=on):
            assert lin(x).dtype == dtype, (precision, on)
    amx, zen3 = tmp_path / "amx", tmp_path / "zen3"
    amx.write_text("flags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    zen3.write_text("flags\t\t: fpu sse avx2 fma\n")
    assert resolve_cpu_bf16("auto", str(amx)) and not resolve_cpu_bf16("auto", str(zen3))
    assert not resolve_cpu_bf16("auto", str(tmp_path / "missing"))  # no /proc/cpuinfo: off
    assert resolve_cpu_bf16("bf16", str(zen3)) and not resolve_cpu_bf16("fp32", str(amx))
    with pytest.raises(UserError, match=r"ssl.cpu_precision: expected auto, bf16 or fp32, got 'fp16'"):
        validate(_cfg("ssl.cpu_precision=fp16"))


def test_cpu_identity_reads_the_first_processor_and_every_stage_records_it(tmp_path):
    """The CPU's name, family and model (a Zen 3 and a Zen 4 are both 'AMD EPYC' by name), the ATen
    dispatch level and native bf16, from /proc/cpuinfo; machine_info (every stage's meta.json) carries it."""
    from src.runtime import cpu_identity, machine_info

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 106\nmodel name\t: other\n")
    got = cpu_identity(str(info))
    assert got == {"name": "AMD EPYC", "family": "25", "model": "17",
                   "capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": True}
    missing = cpu_identity(str(tmp_path / "missing"))
    assert missing["family"] == "" and missing["native_bf16"] is False and missing["name"]
    assert set(machine_info()["cpu"]) == set(got)


def test_ssl_step_under_cpu_bf16_trains_fp32_weights():
    """A training step with ssl.cpu_precision=bf16: finite loss, weights stay float32 and move."""
    cfg = _cfg("ssl.cpu_precision=bf16", "ssl.warmup_epochs=0")  # no warmup: step 0 has a nonzero LR
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    run = SSLRun(cfg, 64, torch.device("cpu"))
    assert run.cpu_bf16
    views, _ = next(DeviceViews(cfg, images, torch.device("cpu"), 8, 0, 32).epoch(0, 1))
    before = [p.detach().clone() for p in run.model.parameters()]
    loss, _ = run.step(views, [], 0)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    after = list(run.model.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("engine, power", [("torch", 1.0), ("onnxruntime", 0.5)])
def test_zero_epochs_embeds_the_pretrained_encoder_as_loaded(engine, power, comp, tmp_path, capsys):
    """ssl.epochs=0: no step runs; 01_ssl writes the loaded encoder unchanged and its embeddings
    (ssl.embed_flip: mean of each image's and its mirror's features; ssl.embed_power: their power
    transform before L2), with either CPU engine."""
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from conftest import run_script
    from src import io
    from src.config import BackboneCfg
    from src.models.encoder import Encoder, embed

    torch.manual_seed(3)
    weights = tmp_path / "w.safetensors"
    source = Encoder(BackboneCfg(name="resnet18", width=4, stem_width=8, small_stem=True)).eval()
    io.save_tensors(weights, source.net.state_dict())
    args = [f"run.root={tmp_path / 'runs'}", "run.name=z", "run.device=cpu", "run.progress=false",
            f"data.path={comp}", "backbone.width=4", "backbone.stem_width=8", f"backbone.pretrained={weights}",
            "ssl.epochs=0", "ssl.embed_flip=true", "ssl.batch_size=16", "ssl.proj_hidden=16", "ssl.proj_dim=8",
            f"ssl.embed_engine={engine}", f"ssl.embed_power={power}"]
    assert run_script("00_prepare.py", *args, capsys=capsys)[0] == 0
    assert run_script("01_ssl.py", *args, capsys=capsys)[0] == 0
    stage = tmp_path / "runs/z/01_ssl"
    saved = io.load_tensors(stage / "encoder.safetensors")
    for key, value in source.net.state_dict().items():
        torch.testing.assert_close(saved[f"net.{key}"], value)  # untouched: no optimiser step ran
    images = np.load(tmp_path / "runs/z/00_prepare/images.npy")
    written = np.load(stage / "embeddings.npy").astype(np.float32)
    flipped = embed(source, images, torch.device("cpu"), 256, "fp32", flip_tta=True)
    plain = embed(source, images, torch.device("cpu"), 256, "fp32")
    # reference: the power transform of the flip-averaged post-ReLU features, L2-normalised (their scale cancels)
    expected = flipped ** power / np.linalg.norm(flipped ** power, axis=1, keepdims=True)
    np.testing.assert_allclose(written, expected, atol=2e-3)  # float16 on disk
    if power != 1.0:
        assert np.abs(written - flipped).max() > 1e-2  # the transform changed them
    assert np.abs(written - plain).max() > 1e-2  # the mirror changed them
    assert not (stage / "log.jsonl").exists() or not io.read_jsonl(stage / "log.jsonl")
    assert (stage / "encoder.onnx").exists() == (engine == "onnxruntime")
    summary = io.read_json(stage / "_done.json")["summary"]
    assert summary["epochs"] == 0 and summary["embed_passes_per_s"] > 0 and summary["embed_seconds"] > 0


def test_zero_epochs_without_weights_is_a_config_error():
    with pytest.raises(UserError, match="ssl.epochs: 0 embeds with the encoder as loaded"):
        validate(_cfg("ssl.epochs=0"))
    with pytest.raises(UserError, match="ssl.epochs: must be >= 0"):
        validate(_cfg("ssl.epochs=-1"))
    with pytest.raises(UserError, match="ssl.embed_engine: expected torch or onnxruntime"):
        validate(_cfg("ssl.embed_engine=tensorrt"))
