"""Stage 01: self-supervised pretraining of the encoder (SimCLR / BYOL / SimSiam / DINO / rotation,
weighted via ssl.objectives) on every image; writes the encoder and the embeddings of all images.

    python pipelines/01_ssl.py -c configs/demo.yaml [section.key=value ...] [--force] [--lr-find]
    torchrun --nproc_per_node=N pipelines/01_ssl.py -c configs/cifar_gpu.yaml   # DDP, one GPU each

Rerunning an interrupted run resumes from its last checkpoint (ssl.checkpoint_every epochs)."""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage
from src.train_utils import run_stage_distributed


def main(cfg, force=False, lr_find=False):
    return run_stage_distributed(get_stage("ssl"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
