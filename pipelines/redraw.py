"""Re-draw evaluation of the ensemble rules (src/selection.py): draw new supports of the
competition's shape (2 train + 1 val labeled images per class) from the non-test images whose
labels the data builder knows, rerun every label-dependent step per draw, apply every rule, score
against truth. Prints and writes runs/<run>/redraw/table.md and results.json.

    python pipelines/00_prepare.py -c configs/demo.yaml && python pipelines/01_ssl.py -c configs/demo.yaml
    python pipelines/redraw.py -c configs/demo.yaml --draws 30
    python pipelines/redraw.py -c configs/demo.yaml --members protonet,knn,pseudo_propagation --rules mean,agreement
    python pipelines/redraw.py -c configs/demo.yaml --draws 20 --encoder-seeds 0,1,2   # + the encoder's variance
    python pipelines/redraw.py -c configs/cifar_cpu_pretrained.yaml --pool test --labels TRUTH.csv --draws 20
    python pipelines/redraw.py -c configs/demo.yaml --draws 30 --cache-commit <commit>   # rescore cached members
    python pipelines/redraw.py -c configs/demo.yaml run.name=A --merge B,C   # one table over runs A, B, C

--encoder-seeds trains one encoder per seed (00_prepare and 01_ssl of run <name>-seed<s>, skipped when
up to date; the run's own seed reuses the run) and draws the same supports on each. --pool test draws
the supports from the test images whose label --labels gives and scores the other labeled test images
(a competition with no labels beyond its support). --merge reads the re-draws that other runs wrote
(their redraw/results.json: other encoder seeds, drawn at other commits) and writes one table over
them and the run's own under redraw/merged/, computing nothing; the runs must share members, rules
and supports (the same --seed, --pool and --labels). Every accuracy estimator (src/estimate.py) is
scored beside the members and rules: mean and worst |estimate - truth|, interval coverage, rank
correlation across members.

With pseudo.crossfit_folds set (-1: leave-one-out folds), each draw's LOO is cross-fitted as 05_heads
does it: round 0 again per fold without that fold's labels (self-training rounds are not re-drawn).

Members: heads of src.heads.HEADS by name, and 04_meta's methods as meta_<method> (meta-trained per draw
from the SSL encoder on the draw's round-0 pseudo-labels; ensemble.count_once=[meta], the default,
counts them as one member in every rule and label-free estimate); default: heads.heads. Rules:
src.ensemble.RULES; default: every rule that can run on the members.

    python pipelines/redraw.py -c configs/demo.yaml --draws 20 --encoder-seeds 0,1,2 \
        --members knn,propagation,meta_maml,meta_reptile --rules agreement,mean"""
import _bootstrap  # noqa: F401

from src.cli import config_parser, guarded
from src.config import load_config
from src.errors import UserError
from src.selection import merge_redraws, run_redraws


def _names(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _seeds(text):
    try:
        return [int(t) for t in _names(text)] if text else None
    except ValueError:
        raise UserError(f"--encoder-seeds: expected comma-separated integers, got '{text}'") from None


if __name__ == "__main__":
    parser = config_parser(__doc__)
    parser.add_argument("--draws", type=int, default=30, help="support re-draws (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--members", default="", help="comma-separated members: heads and meta_<method> (default: heads.heads)")
    parser.add_argument("--rules", default="", help="comma-separated rules (default: every rule that can run on the members)")
    parser.add_argument("--labels", default="", help="image_id,label CSV of every image (default: the data builder's)")
    parser.add_argument("--fresh", action="store_true", help="recompute the cached member outputs")
    parser.add_argument("--cache-commit", default="", help="read the members from the cache written at this commit "
                        "(full hash) and compute none: rescore cached members after a change to rules or estimators")
    parser.add_argument("--encoder-seeds", default="", help="comma-separated run seeds, one encoder each (default: the run's)")
    parser.add_argument("--pool", default="train", choices=["train", "test"],
                        help="supports from the non-test (default) or the labeled test images")
    parser.add_argument("--merge", default="", help="comma-separated runs whose re-draws join this run's in one "
                        "table (redraw/merged/); computes nothing")
    args = parser.parse_args()

    def merge():
        clash = [flag for flag, on in (("--fresh", args.fresh), ("--cache-commit", args.cache_commit),
                                       ("--encoder-seeds", args.encoder_seeds)) if on]
        if clash:
            raise UserError(f"--merge: reads written re-draws; {clash[0]} would compute them")
        merge_redraws(load_config(args.config, args.overrides), _names(args.merge))

    def redraw():
        run_redraws(load_config(args.config, args.overrides), args.draws, _names(args.members), _names(args.rules),
                    seed=args.seed, labels_csv=args.labels, fresh=args.fresh,
                    encoder_seeds=_seeds(args.encoder_seeds), pool_split=args.pool, cache_commit=args.cache_commit)

    guarded(merge if args.merge else redraw)
