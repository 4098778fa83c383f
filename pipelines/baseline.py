"""Baseline beside the pipeline: LabelSpreading (kNN kernel) on PCA pixels with the same labels,
scored on the truth file, printed next to the pipeline's submission accuracy when one exists.

    python pipelines/baseline.py -c configs/demo.yaml
"""
import _bootstrap  # noqa: F401

from src.cli import config_parser, guarded
from src.config import load_config


def main(cfg) -> dict:
    from pathlib import Path

    from src import io
    from src.baselines import label_spreading_pixels
    from src.data import load_data
    from src.data.competition import read_id_label_csv
    from src.errors import UserError
    from src.paths import RunPaths
    from src.submission import score

    if not cfg.data.truth:
        raise UserError("data.truth: the baseline comparison needs a truth file")
    paths = RunPaths(cfg)
    data = load_data(paths)
    truth = read_id_label_csv(Path(cfg.data.truth))  # labels parsed like the submission's (ints or names)
    true = dict(zip(truth["image_id"], truth["label"]))
    ids = data.test_ids
    rows = {}
    for name, use_val in (("LabelSpreading, PCA pixels, train+val labels", True),
                          ("LabelSpreading, PCA pixels, train labels only", False)):
        pred = data.classes[label_spreading_pixels(data, use_val=use_val, seed=cfg.run.seed)]
        scored = [(p, true[i]) for p, i in zip(pred, ids) if i in true]
        rows[name] = sum(p == t for p, t in scored) / len(scored)
    sub = paths.submission("ensemble")
    if sub.exists():
        rows["this pipeline (ensemble submission)"] = score(sub, cfg.data.truth)["accuracy"]
    print(f"test accuracy on {cfg.data.truth} ({len(truth)} images):")
    for name, acc in rows.items():
        print(f"  {acc:.4f}  {name}")
    io.write_json(paths.run / "baseline.json", rows)
    return rows


if __name__ == "__main__":
    args = config_parser(__doc__).parse_args()
    guarded(lambda: main(load_config(args.config, args.overrides)) and None)
