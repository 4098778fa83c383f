"""Every artifact path, derived from the run name. Nothing else in the repository builds paths.

Layout of one run (``runs/<run.name>/``)::

    00_prepare/  images.npy (uint8 N x H x W x 3, memory-mappable)  index.csv (label: class id, -1 unknown)
                 classes.json (class labels in id order)  report.json
                 near_duplicates.json + near_duplicate_pairs.csv (perceptual-hash pass)
    01_ssl/      encoder.safetensors  encoder.json  embeddings.npy (float16 N x D, L2-normalised)
                 trunk.npy + trunk.json (ssl.trunk_cut: the trunk maps, float16)
                 log.jsonl  ckpt/  lr_find.png
    02_pseudo/   round{r}/labels.csv (image_id,label,confidence,source)  round{r}/embeddings.npy ...
                 crossfit/folds.json + crossfit/fold{k}/ (pseudo.crossfit_folds: the same rounds per fold)
    03_metric/   encoder.safetensors  embeddings.npy  arcface.safetensors  log.jsonl
    04_meta/     <method>/probs_test.npy  <method>/oof.npy   (meta-learning heads)
    05_heads/    <head>/probs_test.npy  <head>/oof.npy  cv.json  near_duplicates.json (embedding pass)
    06_submit/   ensemble.json  report/index.html
    <stage>/     config.yaml  meta.json (seed, commit, fingerprint)  _done.json

Every stage directory also gets ``config.yaml`` and ``meta.json`` beside its outputs.
"""
from __future__ import annotations

from pathlib import Path

from src.config import STAGES, Config

STAGE_DIRS = {key: f"{i:02d}_{key}" for i, key in enumerate(STAGES)}  # "ssl" -> "01_ssl"
ENCODER_STAGES = ("metric", "pseudo", "ssl")  # the stages that write an encoder and embeddings, latest first


class RunPaths:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run = Path(cfg.run.root) / cfg.run.name
        self.submissions = Path(cfg.run.submissions_dir)

    def stage(self, name: str) -> Path:
        return self.run / STAGE_DIRS[name]

    # ---- 00 prepare ----
    @property
    def images(self) -> Path:
        return self.stage("prepare") / "images.npy"

    @property
    def index(self) -> Path:
        return self.stage("prepare") / "index.csv"

    @property
    def classes(self) -> Path:
        return self.stage("prepare") / "classes.json"

    @property
    def data_report(self) -> Path:
        return self.stage("prepare") / "report.json"

    # ---- near-duplicate search (00_prepare: hashes; 05_heads: embeddings; eda: pipelines/eda.py) ----
    def near_duplicates(self, stage: str, tag: str = "") -> Path:
        """Summary JSON; tag distinguishes passes in one folder (eda: "" hashes, "_embedding")."""
        return self._eda_or_stage(stage) / f"near_duplicates{tag}.json"

    def near_duplicate_pairs(self, stage: str, tag: str = "") -> Path:
        return self._eda_or_stage(stage) / f"near_duplicate_pairs{tag}.csv"

    def _eda_or_stage(self, stage: str) -> Path:
        return self.run / "eda" if stage == "eda" else self.stage(stage)

    # ---- encoders and embeddings (any stage that trains an encoder) ----
    def encoder(self, stage: str) -> Path:
        return self.stage(stage) / "encoder.safetensors"

    def encoder_spec(self, stage: str) -> Path:
        return self.stage(stage) / "encoder.json"

    def onnx_encoder(self, stage: str, name: str = "") -> Path:
        """The encoder exported to ONNX for the CPU embedding engine (ssl.embed_engine: onnxruntime);
        name: an extra encoder of ssl.extra_encoders (encoder-<name>.onnx)."""
        return self.stage(stage) / (f"encoder-{name}.onnx" if name else "encoder.onnx")

    def trunk_maps(self, stage: str) -> Path:
        """float16 (N, V, C, s, s) maps of the encoder's trunk (ssl.trunk_cut), trunk.json beside it."""
        return self.stage(stage) / "trunk.npy"

    def embeddings(self, stage: str) -> Path:
        return self.stage(stage) / "embeddings.npy"

    def log(self, stage: str) -> Path:
        return self.stage(stage) / "log.jsonl"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.stage(stage) / "ckpt"

    def plot(self, stage: str, name: str) -> Path:
        return self.stage(stage) / f"{name}.png"

    # ---- 02 pseudo-labels ----
    def pseudo_round(self, r: int) -> Path:
        return self.stage("pseudo") / f"round{r}"

    def pseudo_labels(self, r: int | None = None) -> Path:
        """labels.csv of round r; None: the final table the later stages read."""
        if r is None:
            return self.stage("pseudo") / "labels.csv"
        return self.pseudo_round(r) / "labels.csv"

    @property
    def crossfit(self) -> Path:
        """pseudo.crossfit_folds: folds.json (the fold of every labeled image) and fold{k}/."""
        return self.stage("pseudo") / "crossfit"

    def crossfit_fold(self, k: int) -> "RunPaths":
        """The paths of fold k's rounds: the same run, with 02_pseudo's outputs under crossfit/fold{k}/
        (its labels.csv and embeddings.npy are what the pseudo stage writes without fold k's labels)."""
        return _FoldPaths(self, k)

    # ---- 03 metric: ArcFace class centres, usable as a cosine classifier on embeddings("metric") ----
    @property
    def arcface(self) -> Path:
        return self.stage("metric") / "arcface.safetensors"

    # ---- 04 meta, 05 heads: every head writes the same contract ----
    # probs_test.npy: float32 (n_test, C) class probabilities in index order of the test rows;
    # oof.npy: float32 (n_labeled, C) out-of-fold probabilities of the labeled rows (leave-one-out),
    # in the order of CompetitionData.labeled_idx.
    def head_dir(self, head: str, stage: str = "heads") -> Path:
        return self.stage(stage) / head

    def head_probs(self, head: str, stage: str = "heads") -> Path:
        return self.head_dir(head, stage) / "probs_test.npy"

    def head_oof(self, head: str, stage: str = "heads") -> Path:
        return self.head_dir(head, stage) / "oof.npy"

    @property
    def cv_report(self) -> Path:
        return self.stage("heads") / "cv.json"

    # stacking: float32 (R, C) group-fold out-of-fold probabilities of the rows of stack_table
    # (labeled + pseudo-labeled rows: row, y, weight, group, fold, labeled)
    def head_stack_oof(self, head: str, stage: str = "heads") -> Path:
        return self.head_dir(head, stage) / "stack_oof.npy"

    # support re-draws of the local CV: per draw, the support and query rows (indices into the
    # labeled rows) and the query probabilities; keys "<k>-shot/support|query|probs"
    def head_redraws(self, head: str, stage: str = "heads") -> Path:
        return self.head_dir(head, stage) / "redraws.safetensors"

    @property
    def stack_table(self) -> Path:
        return self.stage("heads") / "stack_rows.csv"

    # ---- 05 submit ----
    def submission(self, tag: str) -> Path:
        return self.submissions / f"{self.cfg.run.name}__{tag}.csv"

    @property
    def report_dir(self) -> Path:
        return self.stage("submit") / "report"

    # ---- re-draw evaluation of the ensemble rules (src/selection.py; not a stage) ----
    @property
    def redraw_dir(self) -> Path:
        return self.run / "redraw"

    @property
    def redraw_merged_dir(self) -> Path:
        """One table over the re-draws of several runs (redraw.py --merge)."""
        return self.redraw_dir / "merged"

    # ---- provenance ----
    def done_marker(self, stage: str) -> Path:
        return self.stage(stage) / "_done.json"

    def fingerprint_file(self, stage: str) -> Path:
        return self.stage(stage) / "_fingerprint"


class _FoldPaths(RunPaths):
    """RunPaths whose pseudo stage directory is crossfit/fold{k}/ of the run's: every other stage's
    paths (00_prepare, 01_ssl's embeddings, encoder and trunk maps) are the run's own."""

    def __init__(self, base: RunPaths, k: int):
        super().__init__(base.cfg)
        self.fold_dir = base.crossfit / f"fold{k}"

    def stage(self, name: str) -> Path:
        return self.fold_dir if name == "pseudo" else super().stage(name)
