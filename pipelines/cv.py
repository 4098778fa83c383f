"""Print the local CV table of a run from its 05_heads outputs (and 06_submit's ensembles if run):
the accuracy estimate of cv.estimator [95%] (src/estimate.py: the test images and the labels
together), leave-one-out accuracy [Wilson 95%], support re-draws, episodic estimate (biased), and
the public-truth accuracy beside each row when data.truth is set (scoring only).

    python pipelines/cv.py -c configs/demo.yaml"""
import _bootstrap  # noqa: F401

from src import io
from src.cli import config_parser, guarded
from src.config import load_config
from src.cv import format_cv_table
from src.errors import UserError
from src.estimate import check_estimator
from src.paths import RunPaths


def main(cfg) -> None:
    check_estimator(cfg.cv.estimator)
    paths = RunPaths(cfg)
    if not paths.cv_report.exists():
        raise UserError(f"{paths.cv_report}: no CV report (run pipelines/05_heads.py first)")
    report = io.read_json(paths.cv_report)
    rows = dict(report["heads"])
    ensemble = paths.stage("submit") / "ensemble.json"
    if ensemble.exists():  # ensembles and 04_meta members: LOO, and the re-draws 06_submit scored
        for name, r in io.read_json(ensemble)["rows"].items():
            if name not in rows:
                d = r.get("redraw")
                rows[name] = {"loo": r, "test_accuracy": r.get("test_accuracy"), "estimates": r.get("estimates"),
                              "redraws": {d["shot"]: d} if d else {}}
    print(f"run {cfg.run.name}: embeddings from {report['embeddings']}, {report['n_labeled']} labeled images, "
          f"{report['n_pseudo_support']} pseudo-labeled support images")
    print(format_cv_table(rows, report.get("truth", "") or cfg.data.truth, cfg.cv.estimator))


if __name__ == "__main__":
    args = config_parser(__doc__).parse_args()
    guarded(lambda: main(load_config(args.config, args.overrides)))
