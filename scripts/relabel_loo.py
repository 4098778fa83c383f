"""How far the leave-one-out of a head that reads pseudo-labels is from its test accuracy, two ways,
on the support draws of `pipelines/redraw.py --pool test` (its cached members; run it first):

  group:   what 05_heads does: the held-out image's group (the pseudo-labels nearest to it, which
           inherited its label) leaves the fit with it;
  relabel: 02_pseudo's round 0 is run again without the held-out label (on the shared, label-free
           kNN graph) and the head is fit on the other labels plus all of those pseudo-labels.

    python scripts/relabel_loo.py -c configs/cifar_cpu_pretrained.yaml run.name=RUN \
        --labels TRUTH.csv --draws 20 --members protonet,knn   # after redraw.py ... --pool test

Prints one line per draw and member (test accuracy, both LOOs) and the mean bias of each. With
--table, every member and rule of the redraw run (its results.json) is scored again as redraw.py
scores them, with the relabel LOO in place of the group LOO for the members above, and the re-draw
table (rules and accuracy estimators) is printed and written to runs/<run>/redraw/relabel/. The truth
file scores and draws the supports, as in redraw.py; nothing is fit on it, and no rule or estimator
sees it. A research harness, not a stage (docs/RESULTS.md, "Accuracy estimates"); in a run, the
relabel LOO is 02_pseudo's `pseudo.crossfit_folds=-1` (leave-one-out folds), which 05_heads reads.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from src import io  # noqa: E402
from src.cli import config_parser, guarded  # noqa: E402
from src.config import load_config  # noqa: E402
from src.data import load_data  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.paths import RunPaths  # noqa: E402


def main(args) -> None:
    from src.heads import l2_normalize
    from src.runtime import resolve_device
    from src.selection import DrawInputs, _fingerprint, draw_members, draw_supports, known_labels, relabel
    from src.stages.heads import crossfit_oof
    from src.stages.pseudo import LEAVE_ONE_OUT, labeler_input
    from src.transductive import TransductiveContext

    cfg = load_config(args.config, args.overrides)
    paths, device = RunPaths(cfg), resolve_device(cfg.run.device)
    members = [m for m in args.members.split(",") if m]
    for m in members:
        if m not in cfg.heads.pseudo_heads:
            raise UserError(f"--members: '{m}' reads no pseudo-labels (heads.pseudo_heads: {cfg.heads.pseudo_heads})")
    data = load_data(paths)
    labels = known_labels(cfg, data, args.labels)
    pool = data.test_idx[labels[data.test_idx] >= 0]
    supports = draw_supports(pool, labels[pool], data.n_classes, 3, args.draws, args.seed)
    cache = paths.redraw_dir / "cache" / _fingerprint(cfg, paths, 3, args.seed, "test", args.cache_commit)
    if not cache.is_dir():
        raise UserError(f"{cache}: no member cache (run pipelines/redraw.py --pool test with the same config first)")
    emb = io.read_npy(paths.embeddings("ssl")).astype(np.float32)
    graph = labeler_input(cfg, emb, device)  # label-free: one kNN graph for every draw and held-out label
    context = TransductiveContext(l2_normalize(emb), device)
    loo_cfg = dataclasses.replace(cfg, pseudo=dataclasses.replace(cfg.pseudo, crossfit_folds=LEAVE_ONE_OUT))
    bias = {m: [] for m in members}
    records, table_members, params = [], [], None
    if args.table:
        from src.ensemble import RuleParams
        from src.selection import aggregate, apply_rules, format_markdown, score_draw

        run_info = io.read_json(paths.redraw_dir / "results.json")["aggregate"]
        table_members, rules = run_info["members_list"], run_info["rules_list"]
        params = RuleParams.from_config(cfg.ensemble, cfg.run.seed, cfg.cv.estimator)
    t0 = time.perf_counter()
    for d in range(args.draws):
        data_d = relabel(data, supports[d], labels)
        y, truth = data_d.class_ids[data_d.labeled_idx], labels[data_d.test_idx]
        # round 0 again without each label (pseudo.crossfit_folds -1, as redraw.py and 05_heads run it)
        folds = DrawInputs(loo_cfg, data_d, emb, device, context=context, graph=graph).folds()
        # the draw's cached members (and stacker table); the table's members first
        names = list(dict.fromkeys([*table_members, *members]))
        mem, _ = draw_members(cfg, data, emb, labels, supports[d], names, device, None, cache / f"draw_{d:03d}",
                              context, read_only=True)
        for m in members:
            k = names.index(m)
            acc = float((mem.probs[k].argmax(1) == truth)[truth >= 0].mean())
            group = float((mem.oof[k].argmax(1) == y).mean())
            mem.oof[k] = crossfit_oof(m, cfg, folds, True, None, device)  # the relabel LOO swapped in
            again = float((mem.oof[k].argmax(1) == y).mean())
            bias[m].append((again - acc, group - acc))
            print(f"draw {d} {m}: test {acc:.3f}  LOO group {group:.3f}  LOO relabel {again:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if args.table:
            n = len(table_members)
            mem = dataclasses.replace(mem, names=names[:n], oof=mem.oof[:n], probs=mem.probs[:n],
                                      transductive=mem.transductive[:n], stack=mem.stack[:n])
            records.append(score_draw(mem, apply_rules(mem, rules, params), truth) | {"draw": d})
    if args.table:
        agg = aggregate(records, cfg.ensemble.method)
        md = format_markdown(agg, f"Re-draw evaluation with the relabel LOO ({', '.join(members)}): run "
                                  f"{cfg.run.name}, {args.draws} draws")
        io.write_json(paths.redraw_dir / "relabel" / "results.json", {"aggregate": agg, "draws": records})
        io.write_text(paths.redraw_dir / "relabel" / "table.md", md + "\n")
        print(md)
    for m, b in bias.items():
        b = 100 * np.asarray(b)
        print(f"{m}: LOO - test over {len(b)} draws: relabel mean {b[:, 0].mean():+.1f} (mean abs {np.abs(b[:, 0]).mean():.1f}), "
              f"group mean {b[:, 1].mean():+.1f} (mean abs {np.abs(b[:, 1]).mean():.1f})")


if __name__ == "__main__":
    parser = config_parser(__doc__)
    parser.add_argument("--labels", default="", help="image_id,label CSV (scoring and the draws' supports; default: the data builder's)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (as redraw.py's)")
    parser.add_argument("--members", default="protonet,knn")
    parser.add_argument("--table", action="store_true", help="score every member, rule and estimator of the redraw "
                        "run again with the relabel LOO (writes runs/<run>/redraw/relabel/)")
    parser.add_argument("--cache-commit", default="", help="the commit whose member cache to read (default: the current)")
    guarded(lambda: main(parser.parse_args()))
