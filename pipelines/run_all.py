"""Run the pipeline stages in order: python pipelines/run_all.py -c configs/demo.yaml [--from N --to M].

Unchanged stages are skipped; an interrupted stage resumes from its last checkpoint; the optional
stages in run.skip_stages are left out (their old outputs removed)."""
import _bootstrap  # noqa: F401

from src.cli import config_parser, guarded
from src.config import load_config
from src.stages import all_stages, run_stage, skip_stage


def main(cfg, start=0, stop=99, force=False):
    summaries = {}
    for number, stage in enumerate(all_stages()):
        if not start <= number <= stop:
            continue
        if stage.key in cfg.run.skip_stages:
            skip_stage(stage, cfg)
        else:
            summaries[stage.dirname] = run_stage(stage, cfg, force=force)
    return summaries


if __name__ == "__main__":
    parser = config_parser(__doc__)
    parser.add_argument("--from", dest="start", type=int, default=0, help="first stage number")
    parser.add_argument("--to", dest="stop", type=int, default=99, help="last stage number")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if unchanged")
    args = parser.parse_args()
    guarded(lambda: main(load_config(args.config, args.overrides), args.start, args.stop, args.force) and None)
