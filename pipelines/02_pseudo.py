"""Stage 02: pseudo-label every unlabeled image (test included) over rounds: labelers (label
propagation, k-means, SCAN, prototypes, kNN) on the embeddings -> combine and select (threshold,
class-balanced top-k, FreeMatch) -> FixMatch self-training of the encoder -> re-embed -> again.

    python pipelines/02_pseudo.py -c configs/demo.yaml [section.key=value ...] [--force]
    torchrun --nproc_per_node=N pipelines/02_pseudo.py -c configs/cifar_gpu.yaml   # DDP self-training

Needs 01_ssl. Rerunning an interrupted run resumes after the last finished round (and inside a
round from the self-training checkpoint). With data.truth set it prints precision vs coverage."""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage
from src.stages.pseudo import validate
from src.train_utils import run_stage_distributed


def main(cfg, force=False, lr_find=False):
    validate(cfg)  # bad settings fail before the runner touches the stage directory
    return run_stage_distributed(get_stage("pseudo"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
