"""Stage 00: validate the competition folder (or archive), decode every image once into a uint8
cache, and print the data report (counts, modes, sizes, corrupt files, exact duplicates)."""
import _bootstrap  # noqa: F401

from src.cli import stage_cli
from src.stages import get_stage, run_stage


def main(cfg, force=False, lr_find=False):
    return run_stage(get_stage("prepare"), cfg, force=force, lr_find=lr_find)


if __name__ == "__main__":
    stage_cli(main, __doc__)
