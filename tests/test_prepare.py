"""Stage 00: every bad input gets one line naming the file and the problem, exit status 2, and no
cache left behind; odd image formats are converted and counted; archives extract safely."""
import io as pyio
import json
import subprocess
import sys
import tarfile
import zipfile

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, run_script


def prepare(comp, tmp_path, capsys, *extra):
    args = ["run.root=" + str(tmp_path / "runs"), "run.name=t", "run.device=cpu", "run.progress=false",
            "data.path=" + str(comp), *extra]
    return run_script("00_prepare.py", *args, capsys=capsys)


def assert_no_cache(tmp_path):
    stage = tmp_path / "runs" / "t" / "00_prepare"
    for name in ("images.npy", "index.csv", "classes.json", "report.json", "_done.json"):
        assert not (stage / name).exists(), name
    if stage.exists():
        assert not [p for p in stage.iterdir() if p.name.startswith(".")], "temporary file left behind"


def edit_csv(path, fn):
    frame = pd.read_csv(path, dtype={"image_id": str})
    fn(frame).to_csv(path, index=False)


def first_train_labeled(comp):
    return pd.read_csv(comp / "train_labels.csv", dtype={"image_id": str})["image_id"][0]


BAD_CASES = {
    "missing folder": (lambda c: __import__("shutil").rmtree(c / "val"), "val: folder not found"),
    "missing csv": (lambda c: (c / "val_labels.csv").unlink(), "val_labels.csv: file not found"),
    "missing columns": (lambda c: edit_csv(c / "train_labels.csv", lambda f: f.rename(columns={"label": "y"})),
                        "train_labels.csv: missing column(s) label"),
    "id without image": (lambda c: edit_csv(c / "train_labels.csv", lambda f: pd.concat(
        [f, pd.DataFrame({"image_id": ["train_99999"], "label": [1]})])),
        "train_labels.csv: image_id 'train_99999' has no image"),
    "undecodable image": (lambda c: (c / "test" / "test_00003.png").write_bytes(b"not an image"),
                          "test_00003.png: cannot decode image"),
    "path separator": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(
        image_id=["../etc/passwd"] + f["image_id"].tolist()[1:])), "val_labels.csv: invalid image_id '../etc/passwd'"),
    "duplicate ids": (lambda c: edit_csv(c / "train_labels.csv", lambda f: pd.concat([f, f.iloc[:1]])),
                      "train_labels.csv: duplicate image_id"),
    "unknown class": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(label=[42] + f["label"].tolist()[1:])),
                      "val_labels.csv: label 42 of"),
    "non-integer label": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(label=["cat"] + f["label"].astype(str).tolist()[1:])),
                          "val_labels.csv: label 'cat'"),
    "empty test folder": (lambda c: [p.unlink() for p in (c / "test").iterdir()], "test: no test images"),
    "sample id without image": (lambda c: edit_csv(c / "sample_submission.csv", lambda f: pd.concat(
        [f, pd.DataFrame({"image_id": ["test_77777"], "label": [0]})])), "sample_submission.csv: image_id 'test_77777' has no image"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_no_cache(case, comp, tmp_path, capsys):
    mutate, message = BAD_CASES[case]
    mutate(comp)
    code, err = prepare(comp, tmp_path, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert_no_cache(tmp_path)


def test_missing_competition_folder(tmp_path, capsys):
    code, err = prepare(tmp_path / "nowhere", tmp_path, capsys)
    assert code == 2 and "nowhere: competition folder not found" in err
    assert_no_cache(tmp_path)


def test_skip_corrupt_counts_and_continues(comp, tmp_path, capsys):
    (comp / "train" / "train_00007.png").write_bytes(b"garbage")
    (comp / "test" / "test_00003.png").write_bytes(b"garbage")
    code, _ = prepare(comp, tmp_path, capsys, "data.skip_corrupt=true")
    assert code == 0
    report = json.loads((tmp_path / "runs/t/00_prepare/report.json").read_text())
    assert report["corrupt"] == 2
    index = pd.read_csv(tmp_path / "runs/t/00_prepare/index.csv", dtype={"image_id": str})
    assert "train_00007" not in set(index["image_id"])  # dropped
    assert "test_00003" in set(index["image_id"])  # kept: the submission needs every test id


def test_odd_formats_are_converted_and_counted(comp, tmp_path, capsys):
    gray = np.full((32, 32), 200, np.uint8)
    cv2.imwrite(str(comp / "test" / "test_00000.png"), gray)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 2] = 255  # BGRA: red channel
    rgba[..., 3] = 255
    cv2.imwrite(str(comp / "test" / "test_00001.png"), rgba)
    big = np.zeros((64, 48, 3), np.uint8)
    big[..., 1] = 100
    cv2.imwrite(str(comp / "test" / "test_00002.png"), big)
    code, _ = prepare(comp, tmp_path, capsys)
    assert code == 0
    report = json.loads((tmp_path / "runs/t/00_prepare/report.json").read_text())
    assert report["modes"]["gray"] == 1 and report["modes"]["rgba"] == 1
    assert report["sizes"]["64x48"] == 1 and report["converted"] == 3
    images = np.load(tmp_path / "runs/t/00_prepare/images.npy")
    index = pd.read_csv(tmp_path / "runs/t/00_prepare/index.csv", dtype={"image_id": str})
    row = dict(zip(index["image_id"], range(len(index))))
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert (images[row["test_00000"]] == 200).all()
    assert tuple(images[row["test_00001"]][0, 0]) == (255, 0, 0)  # RGB order
    assert tuple(images[row["test_00002"]][5, 5]) == (0, 100, 0)


def test_cache_layout_and_duplicate_report(comp, tmp_path, capsys):
    import shutil

    shutil.copy(comp / "test" / "test_00005.png", comp / "train" / "train_99998.png")  # cross-split duplicate
    result = prepare(comp, tmp_path, capsys)
    code, out = result[0], result.out
    assert code == 0
    index = pd.read_csv(tmp_path / "runs/t/00_prepare/index.csv", dtype={"image_id": str})
    assert list(index.columns) == ["image_id", "split", "label"]
    assert (index["split"] == "val").sum() == 10 and (index["label"] >= 0).sum() == 30
    sample = pd.read_csv(comp / "sample_submission.csv", dtype={"image_id": str})
    assert index[index["split"] == "test"]["image_id"].tolist() == sample["image_id"].tolist()
    report = json.loads((tmp_path / "runs/t/00_prepare/report.json").read_text())
    assert report["duplicates"]["across_splits"].get("test+train", 0) >= 1
    assert "exact duplicates" in out
    assert np.load(tmp_path / "runs/t/00_prepare/images.npy", mmap_mode="r").shape[0] == len(index)


def _tar_with(tmp_path, members: dict[str, bytes], name="bad.tar.gz"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tf:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, pyio.BytesIO(data))
    return path


def test_archive_member_outside_target_is_refused(tmp_path, capsys):
    archive = _tar_with(tmp_path, {"train/ok.txt": b"x", "../escape.txt": b"x"})
    target = tmp_path / "extracted"
    code, err = prepare(target, tmp_path, capsys, "data.archive=" + str(archive))
    assert code == 2 and "would be written outside the target folder" in err and "bad.tar.gz" in err
    assert not (tmp_path / "escape.txt").exists() and not target.exists()


def test_zip_slip_is_refused(tmp_path):
    from src.data.competition import extract_archive
    from src.errors import UserError

    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(UserError, match="outside the target folder"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_archive_is_extracted_and_prepared(digits_folder, tmp_path, capsys):
    archive = tmp_path / "comp.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(digits_folder, arcname="competition")  # single top folder: unwrapped
    code, _ = prepare(tmp_path / "extracted", tmp_path, capsys, "data.archive=" + str(archive))
    assert code == 0
    assert (tmp_path / "extracted" / "train_labels.csv").exists()


def test_real_process_exit_status(tmp_path):
    """The same contract through a real interpreter process (not in-process)."""
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "00_prepare.py"), f"run.root={tmp_path}",
                           f"data.path={tmp_path / 'missing'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "competition folder not found" in proc.stderr


def test_unlabeled_limit_keeps_labeled_and_test_rows(comp, tmp_path, capsys):
    full = prepare(comp, tmp_path, capsys)
    assert full[0] == 0
    before = pd.read_csv(tmp_path / "runs/t/00_prepare/index.csv", dtype={"image_id": str})
    unlabeled = ((before["split"] == "train") & (before["label"] < 0)).sum()
    result = prepare(comp, tmp_path, capsys, "data.unlabeled_limit=100")
    assert result[0] == 0 and f"{unlabeled - 100} more left out by data.unlabeled_limit" in result.out
    index = pd.read_csv(tmp_path / "runs/t/00_prepare/index.csv", dtype={"image_id": str})
    kept = index[(index["split"] == "train") & (index["label"] < 0)]
    assert len(kept) == 100 and set(kept["image_id"]) <= set(before["image_id"])
    assert kept["image_id"].tolist() == sorted(kept["image_id"])  # file order kept
    for rows in (index[index["label"] >= 0], index[index["split"] == "test"]):  # every labeled and test row stays
        old = before[before["image_id"].isin(rows["image_id"])]
        assert len(old) == len(rows) and old["label"].tolist() == rows["label"].tolist()
    images = np.load(tmp_path / "runs/t/00_prepare/images.npy", mmap_mode="r")
    assert images.shape[0] == len(index)
    report = json.loads((tmp_path / "runs/t/00_prepare/report.json").read_text())
    assert report["unlabeled_train"] == 100 and report["unlabeled_left_out"] == unlabeled - 100
    # the same sample every time (fixed seed), and a limit above the count keeps everything
    again = prepare(comp, tmp_path, capsys, "data.unlabeled_limit=100", "run.name=t2")
    assert again[0] == 0
    same = pd.read_csv(tmp_path / "runs/t2/00_prepare/index.csv", dtype={"image_id": str})
    assert same["image_id"].tolist() == index["image_id"].tolist()
    assert prepare(comp, tmp_path, capsys, f"data.unlabeled_limit={unlabeled + 5}", "run.name=t3")[0] == 0
    assert len(pd.read_csv(tmp_path / "runs/t3/00_prepare/index.csv")) == len(before)
    none = prepare(comp, tmp_path, capsys, "data.unlabeled_limit=0", "run.name=t4")
    assert none[0] == 0
    index = pd.read_csv(tmp_path / "runs/t4/00_prepare/index.csv", dtype={"image_id": str})
    assert not ((index["split"] == "train") & (index["label"] < 0)).any() and (index["label"] >= 0).sum() == 30
    code, err = prepare(comp, tmp_path, capsys, "data.unlabeled_limit=-2", "run.name=t5")
    assert code == 2 and err.count("\n") == 1 and "data.unlabeled_limit: must be >= -1" in err
