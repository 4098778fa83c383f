import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix

from conftest import run_script
from src.config import Config
from src.errors import UserError
from src.submission import score, write_submission


def cfg_for(comp) -> Config:
    cfg = Config()
    cfg.data.path = str(comp)
    return cfg


def test_write_submission_roundtrip_and_sidecar(comp, tmp_path):
    sample = pd.read_csv(comp / "sample_submission.csv", dtype={"image_id": str})
    ids = sample["image_id"].tolist()[::-1]  # any order in, sample order out
    labels = np.arange(len(ids)) % 10
    out = write_submission(cfg_for(comp), tmp_path / "sub.csv", ids, labels, np.arange(10), {"cv": 0.5})
    written = pd.read_csv(out, dtype={"image_id": str})
    assert written["image_id"].tolist() == sample["image_id"].tolist()
    assert dict(zip(written["image_id"], written["label"])) == dict(zip(ids, labels))
    sidecar = pd.read_json(tmp_path / "sub.json", typ="series")
    assert sidecar["cv"] == 0.5 and sum(sidecar["predicted_class_counts"].values()) == len(ids)


@pytest.mark.parametrize("mutate, message", [
    (lambda ids, y: (ids[:-1], y[:-1]), "predictions missing"),
    (lambda ids, y: (ids, np.where(np.arange(len(y)) == 0, 11, y)), "label '11' is not one of the classes"),
])
def test_write_submission_rejects_bad_predictions(comp, tmp_path, mutate, message):
    ids = pd.read_csv(comp / "sample_submission.csv", dtype={"image_id": str})["image_id"].tolist()
    ids, labels = mutate(ids, np.zeros(len(ids), int))
    with pytest.raises(UserError, match=message):
        write_submission(cfg_for(comp), tmp_path / "sub.csv", ids, labels, np.arange(10))
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "sub.json").exists()


def test_score_matches_sklearn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    ids = [f"t{i}" for i in range(200)]
    pd.DataFrame({"image_id": ids, "label": y}).to_csv(tmp_path / "truth.csv", index=False)
    pd.DataFrame({"image_id": ids[::-1], "label": p[::-1]}).to_csv(tmp_path / "sub.csv", index=False)
    result = score(tmp_path / "sub.csv", tmp_path / "truth.csv")
    assert result["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert result["confusion"] == confusion_matrix(y, p).tolist()
    code, _ = run_script("score.py", str(tmp_path / "sub.csv"), str(tmp_path / "truth.csv"), capsys=capsys)
    assert code == 0


def test_score_cli_errors(tmp_path, capsys):
    pd.DataFrame({"image_id": ["a"], "label": [1]}).to_csv(tmp_path / "truth.csv", index=False)
    pd.DataFrame({"image_id": ["b"], "label": [1]}).to_csv(tmp_path / "sub.csv", index=False)
    code, err = run_script("score.py", str(tmp_path / "sub.csv"), str(tmp_path / "truth.csv"), capsys=capsys)
    assert code == 2 and "sub.csv: 1 id(s)" in err
    code, err = run_script("score.py", str(tmp_path / "nope.csv"), str(tmp_path / "truth.csv"), capsys=capsys)
    assert code == 2 and "nope.csv: file not found" in err
