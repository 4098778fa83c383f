"""Reading and validating a competition folder (the contract is documented in input/README.md).

    <folder>/train/<image_id>.<ext>      49,990 images (20 labeled)
    <folder>/val/<image_id>.<ext>        10 images, all labeled
    <folder>/test/<image_id>.<ext>       10,000 images to predict
    <folder>/train_labels.csv            image_id,label  (the labeled subset of train/)
    <folder>/val_labels.csv              image_id,label
    <folder>/sample_submission.csv       image_id,label  (ids define the submission)

Every problem raises :class:`UserError` with one line naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from src.errors import UserError

SPLITS = ("train", "val", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
LABEL_FILES = {"train": "train_labels.csv", "val": "val_labels.csv"}


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------
def extract_archive(archive: str | Path, target: str | Path) -> Path:
    """Extract .tar.xz/.tar.gz/.tgz/.tar/.zip into `target`, refusing members that would land
    outside it (absolute paths, '..', links). Extracts into a temporary sibling, then renames.
    If the archive holds a single top folder, its contents become `target`."""
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise UserError(f"{archive}: archive not found")
    tmp = target.with_name(f".{target.name}.extracting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        root = tmp.resolve()
        name = archive.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(archive, root, info.filename)
                zf.extractall(tmp)
        elif name.endswith((".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar", ".tar.bz2")):
            try:
                with tarfile.open(archive) as tf:
                    members = tf.getmembers()
                    for m in members:
                        _check_member(archive, root, m.name)
                        if not (m.isfile() or m.isdir()):
                            raise UserError(f"{archive}: member '{m.name}' is a link or device: refused")
                    tf.extractall(tmp, members=members)
            except tarfile.TarError as exc:
                raise UserError(f"{archive}: not a readable archive ({exc})") from None
        else:
            raise UserError(f"{archive}: unsupported archive type (use .tar.xz, .tar.gz or .zip)")
        entries = [p for p in tmp.iterdir() if not p.name.startswith(".")]
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() and not (tmp / "test").exists() else tmp
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        content.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _check_member(archive: Path, root: Path, name: str) -> None:
    dest = (root / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not (dest == root or root in dest.parents):
        raise UserError(f"{archive}: member '{name}' would be written outside the target folder: refused")


# ---------------------------------------------------------------------------------------------
# CSVs, ids and labels
# ---------------------------------------------------------------------------------------------
# A label is an integer when its text is a canonical integer ("3", "-1", "+7", "3.0" as pandas writes
# float columns); anything else is a class name, kept verbatim (stripped of surrounding spaces):
# "007" and "cat" are names, so a name is never rewritten when it goes back into the submission.
_INT_LABEL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.0+)?")


def parse_label(text: str) -> int | str:
    """CSV text of one label -> int (integer classes) or str (class names); '' stays ''."""
    text = str(text).strip()
    return int(text.split(".")[0]) if _INT_LABEL.fullmatch(text) else text


def label_kind(values) -> str:
    """'int' or 'name' for a parsed label column (after :func:`read_label_table`)."""
    return "int" if pd.api.types.is_integer_dtype(pd.Series(values).dtype) else "name"


def kind_word(kind: str) -> str:
    return "integers" if kind == "int" else "class names"


def read_label_table(path: Path, columns: tuple[str, ...] = ("image_id", "label")) -> pd.DataFrame:
    """A CSV with an image_id and a label column (extra columns kept) -> DataFrame with image_id
    (str) and label parsed by :func:`parse_label`: int64 when every label is an integer, str (object)
    when every label is a name. Empty or mixed labels raise UserError naming the file and a row.
    Every reader of a label column goes through here, so "007" stays "007" and 3 stays 3."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "label": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(columns)})")
    if "label" in frame.columns:
        frame["label"] = parse_labels(frame["label"], frame["image_id"], path)
    return frame.reset_index(drop=True)


def parse_labels(text: pd.Series, ids: pd.Series, path: Path) -> pd.Series:
    """Label texts -> int64 (all integers) or str (all names); UserError on an empty or mixed column."""
    parsed = [parse_label(t) for t in text]
    empty = [i for i, v in enumerate(parsed) if v == ""]
    if empty:
        raise UserError(f"{path}: empty label of '{ids.iloc[empty[0]]}' on line {empty[0] + 2}")
    is_int = np.array([isinstance(v, int) for v in parsed], dtype=bool)
    if is_int.all():
        return pd.Series(parsed, index=text.index, dtype=np.int64)
    if is_int.any():  # name the first label of the minority kind: that is the likely typo
        odd = is_int if is_int.sum() <= (~is_int).sum() else ~is_int
        row = int(np.flatnonzero(odd)[0])
        kind, other = ("an integer", "class names") if is_int[row] else ("a class name", "integers")
        raise UserError(f"{path}: label '{parsed[row]}' of '{ids.iloc[row]}' is {kind} but {int((~odd).sum())} "
                        f"other label(s) are {other} (mixed label types: use all integers or all class names)")
    return pd.Series(parsed, index=text.index, dtype=object)


def check_id(path: Path, image_id: str) -> None:
    if not image_id or "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("."):
        raise UserError(f"{path}: invalid image_id '{image_id}' (path separators, '..' and leading '.' are refused)")


def read_id_label_csv(path: Path, need_labels: bool = True) -> pd.DataFrame:
    """image_id,label CSV -> DataFrame(image_id: str, label). Validates ids and duplicates. Labels are
    parsed (int64 or str, see :func:`read_label_table`) unless need_labels is False: then they stay
    the file's text (sample_submission.csv holds placeholders)."""
    if need_labels:
        frame = read_label_table(path)[["image_id", "label"]].copy()
    else:
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
        missing = [c for c in ("image_id", "label") if c not in frame.columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (expected image_id,label)")
        frame = frame[["image_id", "label"]].copy()
    empty = frame["image_id"] == ""
    if empty.any():
        raise UserError(f"{path}: empty image_id on line {int(np.flatnonzero(empty.to_numpy())[0]) + 2}")
    for image_id in frame["image_id"]:
        check_id(path, image_id)
    dup = frame["image_id"][frame["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: duplicate image_id '{dup.iloc[0]}' ({len(dup)} duplicate row(s))")
    return frame.reset_index(drop=True)


def list_images(split_dir: Path) -> dict[str, Path]:
    """image_id -> file for every image file in a split folder."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: folder not found")
    files: dict[str, Path] = {}
    for p in sorted(split_dir.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in files:
                raise UserError(f"{p}: duplicate image_id '{p.stem}' (also {files[p.stem].name})")
            files[p.stem] = p
    return files


def image_file(files: dict[str, Path], image_id: str) -> Path | None:
    """The file of a listed id: the id is the file name without extension (train_00042), or the
    file name itself (train_00042.jpg, as many Kaggle CSVs list them) when that file exists."""
    if image_id in files:
        return files[image_id]
    p = files.get(Path(image_id).stem)
    return p if p is not None and p.name == image_id else None


def resolve_ids(path: Path, ids: pd.Series, files: dict[str, Path], split_dir: Path) -> list[Path]:
    """Files of the ids listed in `path`; UserError for an id without an image or two ids of one file."""
    found = [image_file(files, i) for i in ids]
    missing = [i for i, f in zip(ids, found) if f is None]
    if missing:
        raise UserError(f"{path}: image_id '{missing[0]}' has no image in {split_dir} ({len(missing)} missing)")
    seen: dict[Path, str] = {}
    for i, f in zip(ids, found):
        if f in seen:
            raise UserError(f"{path}: image_id '{i}' and '{seen[f]}' are the same image {f.name}")
        seen[f] = i
    return found


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeStats:
    modes: Counter = field(default_factory=Counter)  # 'rgb', 'gray', 'rgba', ...
    sizes: Counter = field(default_factory=Counter)  # 'HxW'
    converted: int = 0  # images that were not already size x size RGB
    corrupt: list = field(default_factory=list)  # files skipped (with --skip-corrupt)


def decode_image(path: Path, size: int, stats: DecodeStats) -> np.ndarray | None:
    """File -> uint8 (size, size, 3) RGB. Gray/RGBA/16-bit/other sizes are converted and counted.
    Returns None if undecodable (the caller decides whether that is an error)."""
    raw = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        return None
    mode = "rgb"
    if img.dtype != np.uint8:  # 16-bit PNG etc.
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
        mode = "16bit"
    if img.ndim == 2:
        img, mode = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), "gray"
    elif img.shape[2] == 4:
        img, mode = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), "rgba"
    elif img.shape[2] == 1:
        img, mode = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB), "gray"
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    stats.modes[mode] += 1
    stats.sizes[f"{h}x{w}"] += 1
    if (h, w) != (size, size):
        interp = cv2.INTER_AREA if h > size or w > size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    if mode != "rgb" or (h, w) != (size, size):
        stats.converted += 1
    return img


def content_hash(img: np.ndarray) -> str:
    return hashlib.blake2b(img.tobytes(), digest_size=12).hexdigest()
