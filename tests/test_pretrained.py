"""Pretrained timm weights (issue 12.3): a local .safetensors / weights-only .pth for any timm model
round-trips and changes the embeddings; a missing file, a pickle or another architecture is a
one-line error (exit 2 through the 01_ssl CLI); data.model_input_size resizes inside the encoder;
timm's hub is used only with backbone.allow_download=true."""
import argparse
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from src import io
from src.config import BackboneCfg, load_config
from src.errors import UserError
from src.models.encoder import Encoder, embed, load_encoder, save_encoder, stem_conv_key

TINY = BackboneCfg(name="resnet18", width=4, stem_width=8, small_stem=False)
IMAGES = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def build(cfg: BackboneCfg, seed: int, **changes) -> Encoder:
    torch.manual_seed(seed)  # different seeds: different random initialisations
    return Encoder(dataclasses.replace(cfg, **changes)).eval()


def save_weights(net: torch.nn.Module, path, wrap: bool = False):
    if path.suffix == ".safetensors":
        io.save_tensors(path, net.state_dict())
    else:  # a typical training checkpoint: tensors under "state_dict", DDP "module." prefix
        state = {f"module.{k}": v for k, v in net.state_dict().items()} if wrap else net.state_dict()
        torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    return path


def features(enc: Encoder) -> np.ndarray:
    return embed(enc, IMAGES, torch.device("cpu"), batch_size=4, precision="fp32")


@pytest.mark.parametrize("name, kwargs, suffix, wrap", [
    ("resnet18", dict(width=4, stem_width=8), ".safetensors", False),
    ("resnet18", dict(width=4, stem_width=8), ".pth", True),
    ("test_convnext", {}, ".pth", False),  # any timm model, not only the named presets
    ("test_vit", {}, ".safetensors", False),
])
def test_weights_round_trip_and_change_embeddings(tmp_path, name, kwargs, suffix, wrap):
    cfg = BackboneCfg(name=name, small_stem=False, **kwargs)
    source = build(cfg, seed=1)
    path = save_weights(source.net, tmp_path / f"w{suffix}", wrap)
    fresh = build(cfg, seed=2)
    loaded = build(cfg, seed=2, pretrained=str(path))
    for key, value in source.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    np.testing.assert_allclose(features(loaded), features(source), atol=1e-6)
    assert np.abs(features(loaded) - features(fresh)).max() > 1e-2  # the weights changed the embeddings


def test_saved_encoder_and_small_stem(tmp_path, capsys):
    """Our own encoder.safetensors ('net.' prefix) loads too; with small_stem the replaced 3x3 stem
    stays freshly initialised and everything else is loaded."""
    source = build(TINY, seed=1)
    save_encoder(source, tmp_path / "encoder.safetensors", tmp_path / "encoder.json")
    loaded = build(TINY, seed=2, pretrained=str(tmp_path / "encoder.safetensors"))
    np.testing.assert_allclose(features(loaded), features(source), atol=1e-6)
    small = build(TINY, seed=2, small_stem=True, pretrained=str(tmp_path / "encoder.safetensors"))
    stem = stem_conv_key(small.net)
    assert f"kept fresh: {stem}" in capsys.readouterr().out
    state, src = small.net.state_dict(), source.net.state_dict()
    assert state[stem].shape[-2:] == (3, 3) and src[stem].shape[-2:] == (7, 7)
    assert all(torch.equal(state[k], v) for k, v in src.items() if k != stem)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope.safetensors", "nope.safetensors: backbone.pretrained weights not found"),
    (lambda d: save_weights(build(TINY, 1, width=8).net, d / "w8.pth"), "of another shape"),
    (lambda d: save_weights(build(TINY, 1, name="resnet34").net, d / "r34.safetensors"), "unexpected"),
    (lambda d: save_weights(build(TINY, 1, name="test_resnet", width=0, stem_width=0).net, d / "t.pth"),
     "weights do not fit backbone 'resnet18'"),
    (lambda d: torch.save({"args": argparse.Namespace(lr=1)}, d / "pickle.pth") or d / "pickle.pth",
     "pickle.pth: not a readable weights file"),
    (lambda d: (d / "bad.safetensors").write_bytes(b"garbage") and d / "bad.safetensors",
     "bad.safetensors: not a readable weights file"),
])
def test_bad_weights_one_line_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        build(TINY, seed=2, pretrained=str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ssl_cli_exit_2_and_nothing_written(comp, tmp_path, capsys):
    args = [f"run.root={tmp_path / 'runs'}", "run.name=p", "run.device=cpu", "run.progress=false",
            f"data.path={comp}", "backbone.name=resnet18", "backbone.width=4", "backbone.stem_width=8",
            "ssl.epochs=1", "ssl.max_steps_per_epoch=1", "ssl.batch_size=16"]
    assert run_script("00_prepare.py", *args, capsys=capsys)[0] == 0
    stage = tmp_path / "runs/p/01_ssl"
    for weights, message in ((tmp_path / "missing.pth", "missing.pth: backbone.pretrained weights not found"),
                             (save_weights(build(TINY, 1, name="resnet34").net, tmp_path / "r34.safetensors"),
                              "r34.safetensors: weights do not fit backbone 'resnet18'")):
        code, err = run_script("01_ssl.py", *args, f"backbone.pretrained={weights}", capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert not (stage / "encoder.safetensors").exists() and not (stage / "_done.json").exists()


def test_model_input_size_resizes_inside_the_encoder(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(TINY, 32, input_size=64).eval()
    seen = []
    enc.net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        ref = enc.net(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    assert seen[0] == (2, 3, 64, 64) and torch.allclose(out, ref)
    save_encoder(enc, tmp_path / "e.safetensors", tmp_path / "e.json")
    again = load_encoder(tmp_path / "e.safetensors", tmp_path / "e.json").eval()
    assert again.input_size == 64
    np.testing.assert_allclose(features(again), features(enc), atol=1e-6)
    with pytest.raises(UserError, match="data.model_input_size: must be >= 0"):
        load_config(None, ["data.model_input_size=-1"])


def test_download_only_when_allowed(tmp_path, monkeypatch):
    import timm

    calls = []
    real = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("hub unreachable")  # never touch the network in tests
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    build(TINY, 0)
    path = save_weights(build(TINY, 1).net, tmp_path / "w.safetensors")
    build(TINY, 0, allow_download=True, pretrained=str(path))  # a local file wins over the hub
    assert calls == [False, False, False]
    with pytest.raises(UserError, match="backbone.allow_download: cannot fetch weights of 'resnet18'"):
        build(TINY, 0, allow_download=True)
    assert calls[-1] is True


def test_cifar_pretrained_config():
    cfg = load_config("configs/cifar_pretrained.yaml")
    assert cfg.backbone.pretrained.endswith(".safetensors") and not cfg.backbone.allow_download
    assert cfg.data.model_input_size == 224 and not cfg.backbone.small_stem
