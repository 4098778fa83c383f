"""Compare every meta-learning method and every inference head on the same encoder:

    python pipelines/compare.py -c configs/demo.yaml [section.key=value ...] [--methods a,b] [--heads x,y]

Meta methods (src/meta) start from the encoder the meta stage would use (meta.encoder, default the
latest of metric > pseudo > ssl). Heads (src/heads) run on that same stage's embeddings with the 30
labeled images as their support: 05_heads may add pseudo-labeled support rows, this table does not,
so every row adapts to the same 30 labels. Transductive heads with a context (src/heads/transductive.py)
see every image's embedding, as in 05_heads. One table: local CV (leave-one-out accuracy over the
labeled images, Wilson 95% interval), public-truth test accuracy when data.truth is set (scoring
only), wall time and peak memory of each. Written to <run>/compare.md and <run>/compare.json.
Stage outputs are not touched: this command trains its own copies (no checkpoints). With
meta.task_augment set, the files are compare_<mode>.md/.json (e.g. compare_rot90_image.md), so runs
with and without task augmentation sit side by side.
"""
import time

import _bootstrap  # noqa: F401
import numpy as np

from src import io
from src.cli import config_parser, guarded
from src.config import load_config
from src.cv import cv_summary, leave_one_out, truth_accuracy
from src.errors import UserError
from src.heads import HEADS, l2_normalize
from src.meta import META_METHODS
from src.meta.base import PeakMemory
from src.runtime import cpu_threads
from src.paths import RunPaths
from src.runtime import machine_info
from src.stages.meta import format_table, prepare_inputs, run_method
from src.transductive import TransductiveContext


def run_head(name, cfg, x, inp):
    """One head on the labeled support (no pseudo-labeled support rows, unlike 05_heads): leave-one-out
    and test probabilities. Transductive heads see the test images (and the held-out one) as queries;
    heads with a context get every image's embedding (built per head, so its seconds include the graph)."""
    from src.stages.heads import make_head

    labeled, y, test = inp.labeled, inp.labeled_y, inp.test
    context = TransductiveContext(x, inp.device)

    def new_head():
        head = make_head(name, cfg, None, inp.device, context)
        return head, ((lambda rows: rows) if head.takes_rows else (lambda rows: x[rows]))

    def fit_predict(train, held):
        head, inputs = new_head()
        query = inputs(np.concatenate([test, labeled[held]])) if head.transductive else None
        head.fit(inputs(labeled[train]), y[train], inp.n_classes, query_x=query)
        return head.predict_proba(inputs(labeled[held]))

    t0 = time.perf_counter()
    with PeakMemory(inp.device) as mem:
        oof = leave_one_out(fit_predict, y)
        head, inputs = new_head()
        head.fit(inputs(labeled), y, inp.n_classes, query_x=inputs(test) if head.transductive else None)
        probs = head.predict_proba(inputs(test))
    return {"kind": "head", "loo": cv_summary(oof, y), "test_accuracy": truth_accuracy(probs, inp.truth),
            "seconds": round(time.perf_counter() - t0, 2), "peak_memory_mb": round(mem.mb, 1)}


def main(cfg, methods=None, heads=None):
    methods = methods or META_METHODS.names()
    heads = heads if heads is not None else HEADS.names()
    for name in heads:
        HEADS.get(name)
    cfg.meta.methods = list(methods)  # validated (unknown names -> UserError) by prepare_inputs
    paths = RunPaths(cfg)
    inp = prepare_inputs(cfg, paths)
    x = None
    if heads:
        path = paths.embeddings(inp.source)
        if not path.exists():
            raise UserError(f"{path}: no embeddings for the heads (stage {inp.source} wrote none)")
        x = l2_normalize(np.asarray(io.read_npy(path), np.float32))
    rows = {}
    with cpu_threads(inp.device, cfg.meta.cpu_threads):  # same thread count for methods and heads
        for name in methods:
            record, _, _ = run_method(name, inp)
            rows[name] = {"kind": "meta", **record}
            print(f"  {name}: LOO {record['loo']['accuracy']:.3f} ({record['seconds']:.1f}s)", flush=True)
        for name in heads:
            rows[name] = run_head(name, cfg, x, inp)
            print(f"  {name}: LOO {rows[name]['loo']['accuracy']:.3f} ({rows[name]['seconds']:.1f}s)", flush=True)
    truth = inp.truth is not None
    text = format_table(rows, truth)
    print(text)
    augment = cfg.meta.task_augment
    header = (f"Comparison on run '{cfg.run.name}': encoder {inp.source} "
              f"({'last block meta-trained' if cfg.meta.train_block else 'frozen embeddings'}), "
              f"meta pool {inp.pool.kind} ({len(inp.pool)} images), task augmentation {augment} "
              f"(methods: {', '.join(n for n in methods if inp.augmented(n)) or 'none'}), device {inp.device}, "
              f"{time.strftime('%Y-%m-%d')}. LOO over {len(inp.labeled)} labeled images, Wilson 95% interval"
              + (f"; test accuracy from {cfg.data.truth} (scoring only)." if truth else "."))
    stem = paths.run / ("compare" if augment == "none" else f"compare_{augment.replace('+', '_')}")
    io.write_text(stem.with_suffix(".md"), header + "\n\n" + format_table(rows, truth, markdown=True) + "\n")
    io.write_json(stem.with_suffix(".json"), {
        "run": cfg.run.name, "encoder": inp.source, "pool": inp.pool.kind, "pool_images": len(inp.pool),
        "task_augment": augment, "device": str(inp.device), "machine": machine_info(inp.device),
        "truth": cfg.data.truth, "trunk_seconds": round(inp.trunk_seconds, 2), "rows": rows})
    print(f"written: {stem.with_suffix('.md')} and {stem.with_suffix('.json').name}")
    return rows


def _names(text):
    return None if text is None else [t for t in text.split(",") if t]


if __name__ == "__main__":
    parser = config_parser(__doc__)
    parser.add_argument("--methods", help="comma-separated meta methods (default: all registered)")
    parser.add_argument("--heads", help="comma-separated heads (default: all registered; '' for none)")
    args = parser.parse_args()
    guarded(lambda: main(load_config(args.config, args.overrides), _names(args.methods), _names(args.heads)) and None)
