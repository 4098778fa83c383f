"""Stage 04: meta-learning and pairwise methods (Siamese, Relation Network, episodic ProtoNet, MAML,
first-order MAML, Reptile, Meta-SGD) trained on episodes from the latest encoder; each writes test
probabilities and leave-one-out probabilities of the labeled images, like the heads of stage 05."""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage, run_stage
from src.stages.meta import validate


def main(cfg, force=False, lr_find=False):
    validate(cfg)  # config errors before the runner touches the stage directory
    return run_stage(get_stage("meta"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
