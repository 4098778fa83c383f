"""Stage 06: ensemble the heads (and 04_meta methods) - mean, CV-weighted mean, rank mean, LightGBM
stacker - write submissions/<run>__ensemble.csv (+ the best single head's) with JSON sidecars,
print local CV beside the truth accuracy, and render runs/<run>/06_submit/report/index.html.

    python pipelines/06_submit.py -c configs/demo.yaml [ensemble.method=stack] [--force]"""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage, run_stage


def main(cfg, force=False, lr_find=False):
    return run_stage(get_stage("submit"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
