"""Stage 05: few-shot inference heads (ProtoNet, transductive ProtoNet, kNN, fine-tuned cosine
classifier, logistic regression) on the latest embeddings, with local CV: leave-one-out accuracy
with a Wilson 95% interval, support re-draws, an episodic estimate (biased by pseudo-labels), and
the public-truth accuracy beside them when data.truth is set.

    python pipelines/05_heads.py -c configs/demo.yaml [heads.heads=[protonet,knn]] [--force]"""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage, run_stage


def main(cfg, force=False, lr_find=False):
    return run_stage(get_stage("heads"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
