"""Stage 03: metric learning from the latest encoder (02_pseudo's when it ran, else 01_ssl's) on the
labeled + selected pseudo-labeled images: weighted pytorch-metric-learning losses (triplet with
semi-hard/hard mining, ArcFace / sub-center ArcFace, contrastive pairs, multi-similarity, or any pml
loss by class name), m-per-class batches. Writes the encoder, the embeddings of every image and the
ArcFace class centres (a cosine classifier for later stages).

    python pipelines/03_metric.py -c configs/demo.yaml [section.key=value ...] [--force]
    python pipelines/03_metric.py -c configs/demo.yaml "metric.losses={NTXentLoss: 1.0}" metric.miner=none

Rerunning an interrupted run resumes from its last epoch checkpoint."""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage, run_stage


def main(cfg, force=False, lr_find=False):
    return run_stage(get_stage("metric"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
