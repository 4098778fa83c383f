"""Class names as labels (issue 12.1): labels may be integers or names, ids may carry the image
extension; names travel prepare -> index.csv/classes.json -> heads -> submission -> scorer, and
mixed or unseen labels stop stage 00 with one line, exit 2 and nothing written."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import run_script
from src.config import load_config
from src.data import load_data
from src.data.competition import parse_label, read_id_label_csv
from src.data.digits import NAMES, build_digits
from src.errors import UserError
from src.paths import RunPaths
from src.stages import get_stage, run_stage
from src.submission import score
from test_prepare import assert_no_cache, edit_csv, prepare


@pytest.fixture(scope="session")
def names_folder(tmp_path_factory):
    """The digits competition with class-name labels and ids listed as file names (built once)."""
    root = tmp_path_factory.mktemp("digits_names")
    return build_digits(root / "comp", root / "truth.csv", n_test=200, seed=0, names=True)


@pytest.fixture
def names_comp(names_folder, tmp_path):
    dst = tmp_path / "comp"
    shutil.copytree(names_folder, dst)
    shutil.copy(names_folder.parent / "truth.csv", tmp_path / "truth.csv")
    return dst


@pytest.mark.parametrize("text, value", [("3", 3), ("-1", -1), ("+7", 7), ("3.0", 3), (" cat ", "cat"),
                                         ("007", "007"), ("1.5", "1.5"), ("NA", "NA"), ("", "")])
def test_parse_label(text, value):
    assert parse_label(text) == value and type(parse_label(text)) is type(value)


def test_read_labels_keeps_kind(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("image_id,label\na,007\nb,cat\nc,NA\n")
    assert read_id_label_csv(path)["label"].tolist() == ["007", "cat", "NA"]  # names verbatim, no NaN
    path.write_text("image_id,label\na,3\nb,0\n")
    frame = read_id_label_csv(path)
    assert frame["label"].dtype == np.int64 and frame["label"].tolist() == [3, 0]


def test_names_prepare_index_and_classes(names_comp, tmp_path, capsys):
    code, err = prepare(names_comp, tmp_path, capsys)
    assert code == 0, err
    stage = tmp_path / "runs/t/00_prepare"
    classes = json.loads((stage / "classes.json").read_text())
    assert classes == {"classes": sorted(NAMES), "kind": "name"}
    index = pd.read_csv(stage / "index.csv", dtype={"image_id": str})
    train = pd.read_csv(names_comp / "train_labels.csv", dtype={"image_id": str})
    got = index.set_index("image_id").loc[train["image_id"], "label"]
    assert [classes["classes"][k] for k in got] == train["label"].tolist()  # label column holds class ids
    assert index["image_id"].str.endswith(".png").all()  # listed ids keep their extension; unlabeled follow
    sample = pd.read_csv(names_comp / "sample_submission.csv", dtype={"image_id": str})
    assert index[index["split"] == "test"]["image_id"].tolist() == sample["image_id"].tolist()
    data = load_data(RunPaths(load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t"])))
    assert data.classes.tolist() == sorted(NAMES) and data.n_classes == 10 and len(data.labeled_idx) == 30
    assert data.encode(["two", "zero"], "x").tolist() == [sorted(NAMES).index("two"), sorted(NAMES).index("zero")]
    with pytest.raises(UserError, match="x: label '3' is not one of the classes"):
        data.encode(["3"], "x")


def _to_ints(path):
    """Rewrite a names CSV with integer labels (0..9) and the image ids without extension."""
    frame = pd.read_csv(path, dtype={"image_id": str, "label": str}, keep_default_na=False)
    frame["image_id"] = frame["image_id"].str.replace(".png", "", regex=False)
    if frame["label"].isin(NAMES).all():
        frame["label"] = frame["label"].map(NAMES.index)
    frame.to_csv(path, index=False)


BAD_CASES = {
    "name among integers": (lambda c: (_to_ints(c / "train_labels.csv"), _to_ints(c / "val_labels.csv"),
                                       edit_csv(c / "val_labels.csv", lambda f: f.assign(
                                           label=["cat"] + f["label"].astype(str).tolist()[1:]))),
                            "val_labels.csv: label 'cat' of 'val_0' is a class name but 9 other label(s) are integers"),
    "integer among names": (lambda c: edit_csv(c / "train_labels.csv", lambda f: f.assign(
        label=f["label"].tolist()[:-1] + ["4"])), "train_labels.csv: label '4' of"),
    "val kind differs": (lambda c: (_to_ints(c / "val_labels.csv")),
                         "val_labels.csv: labels are integers but train_labels.csv has class names"),
    "unseen val name": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(
        label=["zebra"] + f["label"].tolist()[1:])), "val_labels.csv: label zebra of 'val_0.png' is not one of the classes"),
    "empty label": (lambda c: (c / "train_labels.csv").write_text(
        (c / "train_labels.csv").read_text().replace(",seven\n", ",\n", 1)), "train_labels.csv: empty label of"),
    "extension of another file": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(
        image_id=["val_0.jpg"] + f["image_id"].tolist()[1:])), "val_labels.csv: image_id 'val_0.jpg' has no image"),
    "same file twice": (lambda c: edit_csv(c / "val_labels.csv", lambda f: f.assign(
        image_id=["val_1"] + f["image_id"].tolist()[1:])), "are the same image val_1.png"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_labels_exit_2_one_line_nothing_written(case, names_comp, tmp_path, capsys):
    mutate, message = BAD_CASES[case]
    mutate(names_comp)
    code, err = prepare(names_comp, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert_no_cache(tmp_path)


def test_integer_placeholder_in_sample_is_noted(names_comp, tmp_path, capsys):
    edit_csv(names_comp / "sample_submission.csv", lambda f: f.assign(label=0))
    result = prepare(names_comp, tmp_path, capsys)
    assert result[0] == 0 and "note: sample_submission.csv labels are integers but the classes are class names" \
        in result.out


def _pipeline(comp, truth, tmp_path, name):
    """00 prepare, fake 01/02 (PCA embeddings, prototype pseudo-labels), 05 heads, 06 submit."""
    from test_report import make_run

    cfg, paths, _ = make_run(comp, tmp_path, truth=truth, name=name, extra=(
        "heads.heads=[protonet,knn,logreg]", "ensemble.method=mean", "ensemble.report=false"))
    run_stage(get_stage("heads"), cfg)
    summary = run_stage(get_stage("submit"), cfg)
    return paths, summary


def test_names_end_to_end_match_integer_run(names_comp, tmp_path, capsys):
    """The same competition with names and with integers: the same predictions, the names written
    back, and the scorer agreeing with the stage's truth accuracy."""
    ints = tmp_path / "ints"
    shutil.copytree(names_comp, ints)
    for f in ("train_labels.csv", "val_labels.csv", "sample_submission.csv"):
        _to_ints(ints / f)
    shutil.copy(tmp_path / "truth.csv", tmp_path / "truth_ints.csv")
    _to_ints(tmp_path / "truth_ints.csv")
    p_names, s_names = _pipeline(names_comp, tmp_path / "truth.csv", tmp_path, "names")
    p_ints, s_ints = _pipeline(ints, tmp_path / "truth_ints.csv", tmp_path, "ints")
    sub_n = pd.read_csv(p_names.submission("ensemble"), dtype=str, keep_default_na=False)
    sub_i = pd.read_csv(p_ints.submission("ensemble"), dtype={"image_id": str})
    sample = pd.read_csv(names_comp / "sample_submission.csv", dtype=str)
    assert sub_n["image_id"].tolist() == sample["image_id"].tolist()  # ids as the sample lists them (.png)
    assert set(sub_n["label"]) <= set(NAMES)
    assert sub_n["label"].tolist() == [NAMES[k] for k in sub_i["label"]]  # same predictions, names written back
    scored = score(p_names.submission("ensemble"), tmp_path / "truth.csv")
    assert scored["accuracy"] == pytest.approx(s_names["test_accuracy"]) == pytest.approx(s_ints["test_accuracy"])
    assert set(scored["per_class"]) == set(NAMES)
    code, err = run_script("score.py", str(p_names.submission("ensemble")), str(tmp_path / "truth_ints.csv"),
                           capsys=capsys)
    assert code == 2 and "labels are class names but" in err and "truth_ints.csv has integers" in err


def test_builder_refuses_a_folder_or_truth_of_the_other_kind(names_folder, tmp_path):
    """data.builder builds only into a missing data.path: with demo.yaml's input/digits (integers) already
    built, data.builder=digits_names must stop, not run on integer labels (or overwrite the truth file)."""
    from src.data.prepare import ensure_competition_folder

    def cfg(builder, path, truth):
        return load_config(None, [f"data.builder={builder}", f"data.path={path}", f"data.truth={truth}"])

    truth = names_folder.parent / "truth.csv"
    assert ensure_competition_folder(cfg("digits_names", names_folder, truth)) == names_folder
    with pytest.raises(UserError, match=r"train_labels.csv: holds class names as labels, but "
                                        r"data.builder=digits builds integers .*data.path=input/digits "):
        ensure_competition_folder(cfg("digits", names_folder, truth))
    missing = tmp_path / "new"  # a new folder whose truth file belongs to the other kind: nothing is built
    with pytest.raises(UserError, match=r"truth.csv: holds class names as labels, but data.builder=digits"):
        ensure_competition_folder(cfg("digits", missing, truth))
    assert not missing.exists() and not (tmp_path / ".new.building").exists()
