"""What a device run brings back (src/export.py): pack it into a folder, or join the encoder shards.

    python pipelines/pack.py out -c configs/cifar_gpu.yaml run.name=RUN --out "$OUT" [--encoder-stage ssl]
    python pipelines/pack.py join FOLDER_WITH_SHARDS runs/RUN/01_ssl   # -> encoder.safetensors + encoder.json

`out` writes what exists (a failed run still returns its log and bench JSON), prints what is
missing or dropped, and exits 1 if something is missing or the folder breaks the return limits."""
import _bootstrap  # noqa: F401

import argparse
from pathlib import Path

from src.cli import guarded
from src.config import load_config
from src.errors import UserError
from src.export import join_encoder_shards, pack_outputs
from src.paths import STAGE_DIRS


def out(args) -> int:
    if args.encoder_stage != "auto" and args.encoder_stage not in STAGE_DIRS:
        raise UserError(f"--encoder-stage: unknown stage '{args.encoder_stage}' (known: auto, {', '.join(STAGE_DIRS)})")
    result = pack_outputs(load_config(args.config, args.overrides), Path(args.out), args.encoder_stage)
    for name, size in result["written"].items():
        print(f"pack: {name} {size / 2**20:.2f} MiB")
    for line in result["notes"] + result["problems"]:
        print(f"pack: {line}")
    return 1 if (result["notes"] or result["problems"]) else 0


def join(args) -> int:
    weights, spec = join_encoder_shards(Path(args.shards), Path(args.target))
    print(f"join: {weights} and {spec}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("out", help="pack the run's results into a folder within the device return limits")
    p.add_argument("-c", "--config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (run.name=RUN)")
    p.add_argument("--out", required=True, help="folder to write ($OUT on the device)")
    p.add_argument("--encoder-stage", default="auto",
                   help="whose encoder to return (default auto: the latest of metric, pseudo, ssl that wrote one)")
    p.set_defaults(fn=out)
    p = sub.add_parser("join", help="encoder shards -> encoder.safetensors + encoder.json")
    p.add_argument("shards", help="folder holding encoder-K-of-N.safetensors")
    p.add_argument("target", help="folder to write encoder.safetensors and encoder.json into")
    p.set_defaults(fn=join)
    args = parser.parse_args()
    guarded(lambda: args.fn(args))
