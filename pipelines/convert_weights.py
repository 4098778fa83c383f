"""Convert pretrained weights to timm names: python pipelines/convert_weights.py SOURCE OUT.safetensors [--model TIMM_NAME]

SOURCE is an installed weight source (efficientnet_lite0, efficientnet_lite1, efficientnet_lite2;
--model defaults to its timm model) or a checkpoint file (.pth, or .safetensors already in timm
names; --model required: the timm architecture its tensors map onto, in order, every shape checked).
OUT gets every tensor under the timm model's names, classifier included, and loads with
backbone.name=TIMM_NAME backbone.pretrained=OUT.safetensors."""
import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from src import io
from src.cli import guarded
from src.errors import UserError


def main(source: str, out: Path, model: str = "") -> None:
    from src.models.weights import WEIGHT_SOURCES, convert

    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the output must be a .safetensors file")
    state, model = convert(source, model)
    io.save_tensors(out, state)  # atomic: a temporary name renamed into place
    side = f"; native input {WEIGHT_SOURCES.get(source).resolution}px (data.model_input_size)" \
        if source in WEIGHT_SOURCES and not Path(source).is_file() else ""
    print(f"wrote {len(state)} tensors of timm model '{model}' to {out}{side}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="weight source name or checkpoint file")
    parser.add_argument("out", type=Path, help="output .safetensors (timm names)")
    parser.add_argument("--model", default="", help="timm model to map onto (required for a file)")
    args = parser.parse_args()
    guarded(lambda: main(args.source, args.out, args.model))
