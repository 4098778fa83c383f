"""Near-duplicate search (issue 12.2): the hashes against references, planted near-duplicates
(shifted, JPEG re-compressed, brightened copies) found and unrelated images not, groups within and
across splits, the embedding pass, the stage 00 / 05 outputs, test images as extra support (tied
to their labeled twin in CV), and the pairs grid in the run report."""
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.fft

from conftest import run_script
from src import io
from src.config import load_config
from src.data import load_data
from src.data import near_duplicates as nd
from src.heads import l2_normalize
from src.paths import RunPaths
from test_report import SMALL, make_run


def photos(n: int, seed: int = 0) -> np.ndarray:
    """Unrelated CIFAR-like images (N, 32, 32, 3) uint8: a few smooth objects (ellipses) on a colour
    gradient, slightly blurred and stored as JPEG (quality 75), as web images are."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        img = cv2.resize(rng.integers(30, 200, (2, 2, 3)).astype(np.uint8), (32, 32), interpolation=cv2.INTER_LINEAR)
        for _ in range(3):
            colour = tuple(int(v) for v in rng.integers(30, 200, 3))
            centre, axes = tuple(int(v) for v in rng.integers(4, 28, 2)), tuple(int(v) for v in rng.integers(4, 12, 2))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        out[i] = jpeg(cv2.GaussianBlur(img, (0, 0), 1.0), 75)
    return out


def pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """A stand-in encoder for tests: 8x8 area-averaged pixels, centred and L2-normalised (N, 192)."""
    x = np.stack([cv2.resize(im.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) for im in images])
    x = x.reshape(len(images), -1)
    return l2_normalize(x - x.mean(0))


def shifted(img):  # one pixel right and down, edges replicated
    m = np.float32([[1, 0, 1], [0, 1, 1]])
    return cv2.warpAffine(img, m, (32, 32), borderMode=cv2.BORDER_REPLICATE)


def jpeg(img, quality=60):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def brighter(img, delta=30):
    return np.clip(img.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def planted(n=300):
    """n unrelated train/test images plus four near-duplicates: test copies of train images 0-2
    (shifted by one pixel, re-saved as JPEG, brightened) and a train copy of train image 3
    (brightened and re-saved)."""
    images = photos(n)
    split = np.array(["train"] * (n // 2) + ["test"] * (n - n // 2), dtype=object)
    label = np.full(n, -1)
    label[:3] = [0, 1, 2]  # the shifted, re-saved and brightened originals are labeled
    copies = [shifted(images[0]), jpeg(images[1], 90), brighter(images[2]), jpeg(brighter(images[3], 15), 90)]
    images = np.concatenate([images, np.stack(copies)])
    split = np.concatenate([split, ["test", "test", "test", "train"]])
    label = np.concatenate([label, [-1, -1, -1, -1]])
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(images))], "split": split, "label": label})
    return images, index, [(0, n), (1, n + 1), (2, n + 2), (3, n + 3)]


# ---------------------------------------------------------------------------------------------
# Hashes against references
# ---------------------------------------------------------------------------------------------
def test_dct_matrix_matches_scipy():
    x = np.random.default_rng(0).normal(size=(32, 32))
    c = nd.dct_matrix(32)
    np.testing.assert_allclose(c @ x, scipy.fft.dct(x, type=2, axis=0), atol=1e-9)
    np.testing.assert_allclose(c @ x @ c.T, scipy.fft.dct(scipy.fft.dct(x, type=2, axis=0), type=2, axis=1),
                               atol=1e-8)


def test_hashes_match_direct_definitions():
    """dHash and pHash against a per-image transcription of imagehash's definitions (scipy DCT)."""
    images = photos(5, seed=3)
    gray = nd.grayscale(images)
    for g, d, p in zip(gray, nd.dhash_bits(gray), nd.phash_bits(gray)):
        small = cv2.resize(g, (9, 8), interpolation=cv2.INTER_AREA)
        assert (d == (small[:, 1:] > small[:, :-1]).ravel()).all()
        low = scipy.fft.dct(scipy.fft.dct(g.astype(np.float64), axis=0), axis=1)[:8, :8]
        assert (p == (low > np.median(low)).ravel()).all()


def test_phash_matches_imagehash_when_installed():
    """The reference implementation (requirements-bench.txt) on 32x32 gray images: identical bits."""
    imagehash = pytest.importorskip("imagehash")
    from PIL import Image

    gray = np.round(nd.grayscale(photos(8, seed=5))).astype(np.uint8)
    ours = nd.phash_bits(gray.astype(np.float32))
    for g, bits in zip(gray, ours):
        assert (imagehash.phash(Image.fromarray(g)).hash.ravel() == bits).all()


# ---------------------------------------------------------------------------------------------
# Planted near-duplicates
# ---------------------------------------------------------------------------------------------
def test_planted_near_duplicates_found_unrelated_not():
    """Hashes find the re-saved and brightened copies; a one-pixel shift moves too many of 64 bits
    at 32x32 (13 on the real data's median) and is left to the embedding pass (next test)."""
    images, index, (shift, *want) = planted()
    codes = nd.hash_codes(images)
    pairs = nd.hash_pairs(codes, max_distance=6, k=10)  # the default dedup.hash_distance
    found = set(zip(pairs["a"].tolist(), pairs["b"].tolist()))
    assert found - {shift} == set(want), pairs  # every re-saved/brightened copy, no unrelated image
    # distances match a brute-force popcount
    bits = np.unpackbits(codes, axis=1).astype(int)
    for p in pairs.itertuples():
        assert p.dhash == np.abs(bits[p.a, :64] - bits[p.b, :64]).sum()
        assert p.phash == np.abs(bits[p.a, 64:] - bits[p.b, 64:]).sum()
    pairs = pairs[[(a, b) in want for a, b in zip(pairs["a"], pairs["b"])]]
    s = nd.summarize(pairs, index, images, "dhash+phash", {}, 0.0)
    assert s["pairs"] == 3 and s["identical_pairs"] == 0
    assert s["pairs_across_splits"] == {"test+train": 2} and s["pairs_within_split"] == {"train": 1}
    assert s["groups_across_splits"] == {"test+train": 2} and s["groups_within_split"] == {"train": 1}
    assert s["labeled_test_pairs"] == 2 and s["label_conflicts"] == 0 and s["images"] == 6


def test_planted_shift_found_by_embedding():
    images, index, planted_pairs = planted()
    pairs = nd.embedding_pairs(pixel_embeddings(images), min_cosine=0.9, k=10)
    found = set(zip(pairs["a"].tolist(), pairs["b"].tolist()))
    assert planted_pairs[0] in found and found <= set(planted_pairs), pairs  # the shift; nothing unrelated
    s = nd.summarize(pairs, index, images, "embedding cosine", {}, 0.0)
    assert s["pairs_across_splits"]["test+train"] >= 1 and s["labeled_test_pairs"] >= 1


def test_groups_merge_and_report_conflicts():
    images, index, _ = planted(20)
    pairs = pd.DataFrame({"a": [0, 1, 5], "b": [1, 2, 6], "dhash": 0, "phash": 0})  # 0-1-2 chained: one group
    s = nd.summarize(pairs, index, images, "x", {}, 0.0)
    assert s["groups"] == 2 and s["images"] == 5 and s["label_conflicts"] == 1  # labels 0, 1, 2 in one group
    assert s["groups_within_split"] == {"train": 2} and s["largest_groups"][0] == ["i0 (train)", "i1 (train)",
                                                                                   "i2 (train)"]


def test_embedding_pairs_threshold_and_brute_force():
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(400, 32)).astype(np.float32))
    x[10] = l2_normalize(x[3:4] + 0.02 * rng.normal(size=(1, 32)).astype(np.float32))[0]  # cos ~0.99 with 3
    x[11] = l2_normalize(x[4:5] + 0.15 * rng.normal(size=(1, 32)).astype(np.float32))[0]  # cos ~0.7: not a pair
    pairs = nd.embedding_pairs(x, min_cosine=0.95, k=5)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    brute = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(sims >= 0.95)))}
    assert set(zip(pairs["a"], pairs["b"])) == brute == {(3, 10)}
    assert pairs["cosine"].iloc[0] == pytest.approx(sims[3, 10], abs=1e-4)


def test_duplicate_support_skips_ambiguous_test_images():
    class_ids = np.array([0, 1, -1, -1, -1, 0])
    split = np.array(["train", "train", "test", "test", "train", "val"])
    # test 2: twin of 0 and of 5 (both class 0): kept once; test 3: twins of classes 1 and 0: ambiguous;
    # test-test and test-unlabeled pairs carry no label
    pairs = pd.DataFrame({"a": [0, 5, 1, 0, 3, 2], "b": [2, 2, 3, 3, 4, 3]})
    sup = nd.duplicate_support(pairs, class_ids, split)
    assert sup.to_dict("list") == {"row": [2], "y": [0], "source": [0]}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def test_stage_00_reports_planted_cross_split_pair(comp, tmp_path, capsys):
    test_img = cv2.imread(str(comp / "test" / "test_00005.png"))
    cv2.imwrite(str(comp / "train" / "train_99998.png"), jpeg(brighter(test_img, 20), 50))
    args = [f"run.root={tmp_path / 'runs'}", "run.name=t", "run.progress=false", f"data.path={comp}"]
    result = run_script("00_prepare.py", *args, capsys=capsys)
    assert result[0] == 0, result[1]
    stage = tmp_path / "runs/t/00_prepare"
    pairs = pd.read_csv(stage / "near_duplicate_pairs.csv", dtype={"a_id": str, "b_id": str})
    found = set(zip(pairs["a_id"], pairs["b_id"])) | set(zip(pairs["b_id"], pairs["a_id"]))
    assert ("train_99998", "test_00005") in found
    summary = io.read_json(stage / "near_duplicates.json")
    assert summary["pairs_across_splits"].get("test+train", 0) >= 1
    assert io.read_json(stage / "report.json")["near_duplicates"]["pairs"] == summary["pairs"] == len(pairs)
    assert "near duplicates (dhash+phash" in result.out
    # off: nothing searched, nothing written
    args[1] = "run.name=nohash"
    off = run_script("00_prepare.py", *args, "dedup.hash=false", capsys=capsys)
    assert off[0] == 0, off[1]
    assert not (tmp_path / "runs/nohash/00_prepare/near_duplicates.json").exists()


def test_test_support_is_tied_to_its_labeled_twin(monkeypatch):
    """A near-duplicate test row joins the support with its twin's class and leaves it with the twin."""
    import src.stages.heads as stage

    x = np.eye(10, dtype=np.float32)
    labeled, labeled_y = np.arange(4), np.array([0, 0, 1, 1])
    seen = []

    class Spy:
        transductive, runs_encoder = False, False

        def fit(self, sx, sy, n_classes, query_x=None, support_weight=None):
            seen.append((sorted(int(np.argmax(r)) for r in sx), sorted(np.asarray(sy).tolist())))
            return self

        def predict_proba(self, q):
            return np.full((len(q), 2), 0.5, np.float32)

    monkeypatch.setattr(stage, "make_head", lambda *a, **k: Spy())
    empty = np.zeros(0, np.int64)
    h = stage.HeadInputs(x=x, images=None, n_classes=2, labeled=labeled, labeled_y=labeled_y, test=np.array([8, 9]),
                         pseudo=empty, pseudo_y=empty, pseudo_w=np.zeros(0, np.float32), pseudo_group=empty,
                         dup=np.array([8]), dup_y=np.array([1]), dup_group=np.array([2]))  # 8: twin of labeled 2
    fp = stage.fit_predict_fn("spy", load_config(None), h, None, "cpu", False, labeled, labeled_y,
                              np.ones(4, np.float32), np.arange(4), h.test)
    from src.cv import leave_one_out
    leave_one_out(fp, labeled_y)
    assert [rows for rows, _ in seen] == [[1, 2, 3, 8], [0, 2, 3, 8], [0, 1, 3], [0, 1, 2, 8]]
    assert seen[0][1] == [0, 1, 1, 1]  # row 8 carries class 1
    seen.clear()
    stage._predict_test(h, Spy(), use_pseudo=False)
    assert seen[0][0] == [0, 1, 2, 3, 8]


def test_heads_and_report_with_near_duplicates(comp, digits_folder, tmp_path, capsys):
    """05_heads with the embedding pass and test support: a planted twin of a labeled image in the
    test set is supported and predicted as its class; the report draws both pair grids."""
    shutil.copy(digits_folder.parent / "truth.csv", comp.parent / "truth.csv")
    train = pd.read_csv(comp / "train_labels.csv", dtype={"image_id": str})
    twin_of, twin_class = train["image_id"][0], int(train["label"][0])
    src_img = cv2.imread(str(comp / "train" / f"{twin_of}.png"))
    cv2.imwrite(str(comp / "test" / "test_09999.png"), jpeg(src_img, 90))
    sample = pd.read_csv(comp / "sample_submission.csv", dtype={"image_id": str})
    pd.concat([sample, pd.DataFrame({"image_id": ["test_09999"], "label": [0]})]).to_csv(
        comp / "sample_submission.csv", index=False)
    cfg, paths, overrides = make_run(comp, tmp_path, pseudo=False,
                                     extra=["heads.heads=[protonet,knn]", "dedup.test_support=true",
                                            "dedup.embedding_cosine=0.99", "dedup.report_pairs=8",
                                            "ensemble.report_tsne_points=0"])
    assert run_script("05_heads.py", *overrides, capsys=capsys)[0] == 0
    data = load_data(paths)
    cv = io.read_json(paths.cv_report)
    assert cv["n_near_duplicate_support"] >= 1
    assert io.read_json(paths.near_duplicates("heads"))["method"] == "embedding cosine"
    row = data.test_ids.index("test_09999")
    for head in ("protonet", "knn"):
        assert data.classes[io.read_npy(paths.head_probs(head))[row].argmax()] == twin_class
    result = run_script("06_submit.py", *overrides, capsys=capsys)
    assert result[0] == 0, result[1]
    html = (paths.report_dir / "index.html").read_text()
    assert "Near-duplicate images" in html
    for name in ("near_duplicates_prepare.png", "near_duplicates_heads.png"):
        png = (paths.report_dir / name).read_bytes()
        assert f'src="{name}"' in html and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_eda_script_writes_and_prints(comp, tmp_path, capsys):
    args = [f"run.root={tmp_path / 'runs'}", "run.name=t", "run.progress=false", f"data.path={comp}",
            "dedup.hash=false"]
    assert run_script("00_prepare.py", *args, capsys=capsys)[0] == 0
    result = run_script("eda.py", *args, capsys=capsys)
    assert result[0] == 0 and "near duplicates (dhash+phash" in result.out
    paths = RunPaths(load_config(None, args))
    assert io.read_json(paths.near_duplicates("eda"))["method"] == "dhash+phash"
    code, err = run_script("eda.py", *args, "--embeddings", "ssl", capsys=capsys)
    assert code == 2 and "--embeddings ssl: that stage wrote no embeddings" in err
