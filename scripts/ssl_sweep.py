"""The sweep behind configs/cifar_cpu.yaml: one SSL candidate trained for a fixed number of optimiser
steps on a prepared run, probed at 1/4, 2/4, 3/4 and 4/4 of them (docs/RESULTS.md, issue 13).

    python scripts/ssl_sweep.py TAG STEPS -c configs/cifar_cpu.yaml run.name=RUN [overrides...]
    python scripts/ssl_sweep.py v16 367 -c configs/cifar_cpu.yaml run.name=rx backbone.small_stem=true ssl.view_size=16

The cosine schedule spans STEPS (a short run is a whole run, not the start of a long one). Each probe
line (JSON, stdout and runs/<RUN>/sweep/<TAG>.jsonl) holds: training seconds (probes excluded),
views/s, FLOPs per view (FlopCounterMode, forward + backward), the stage's kNN probe (LOO on the 30
labels; 5-fold inside the truth file) and RankMe; the last one adds `prop_public`, 02_pseudo's
label-propagation labels (30 seeds) scored on the truth file. The truth file only scores the candidate after
training; nothing in training reads it. This is a research harness, not a stage: the recipe is the
config, and `bench.py pipeline` measures it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from src.config import load_config  # noqa: E402
from src.data.dataset import load_data  # noqa: E402
from src.paths import RunPaths  # noqa: E402
from src.probe import truth_rows  # noqa: E402
from src.runtime import resolve_device  # noqa: E402
from src.ssl.trainer import SSLRun, probe  # noqa: E402
from src.ssl.views import make_views  # noqa: E402
from src.train_utils import cosine_ramp, warmup_cosine  # noqa: E402
from src.pseudo.labelers import LABELERS, LabelingContext  # noqa: E402
from src.transductive import center_normalize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tag")
    parser.add_argument("steps", type=int, help="optimiser steps (the schedule's length)")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    paths = RunPaths(cfg)
    data, device = load_data(paths), resolve_device(cfg.run.device)
    epochs = -(-args.steps * cfg.ssl.batch_size // len(data.images)) + 1  # enough epochs; schedule set below
    cfg = dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, epochs=epochs))
    torch.manual_seed(cfg.run.seed)
    run = SSLRun(cfg, len(data.images), device)
    run.wrap()
    run.lrs = warmup_cosine(run.base_lr, args.steps, int(cfg.ssl.warmup_epochs * run.steps),
                            final=run.base_lr * cfg.ssl.min_lr_ratio)
    run.momentum = cosine_ramp(cfg.ssl.ema, 1.0, args.steps)
    views = make_views(cfg, data.images, device, run.batch, run.encoder, run.model.uses_local, run.channels_last)
    out = paths.run / "sweep" / f"{args.tag}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    probe_at = {max(1, round(args.steps * q / 4)) for q in (1, 2, 3, 4)}
    step, epoch, t_train, flops_view = 0, 0, 0.0, 0.0
    while step < args.steps:
        for v, lv in views.epoch(epoch, run.steps):
            if step == 0:  # count once, on the meta-free real batch (forward + backward)
                with FlopCounterMode(display=False) as counter:
                    run.net(v, lv, views.rows)[0].backward()
                run.optimizer.zero_grad(set_to_none=True)
                flops_view = counter.get_total_flops() / (run.batch * (len(v) + len(lv)))
            t0 = time.perf_counter()
            loss, _ = run.step(v, lv, step, views.rows)
            loss = float(loss)  # host sync: the timing covers the whole step
            t_train += time.perf_counter() - t0
            step += 1
            if step in probe_at:
                run.net.eval()
                record = {"tag": args.tag, "t": round(t_train, 1), "step": step, "epoch": round(step / run.steps, 2),
                          "loss": round(loss, 4), "views_s": round(step * run.batch * len(v) / t_train, 1),
                          "mflop_view": round(flops_view / 1e6, 1),
                          **{k: round(float(x), 4) for k, x in probe(run, data, cfg).items()}}
                if step == args.steps and cfg.data.truth:
                    record["prop_public"] = propagation_accuracy(run, data, cfg)
                run.net.train()
                print(json.dumps(record), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if step >= args.steps:
                break
        epoch += 1


def propagation_accuracy(run: SSLRun, data, cfg) -> float:
    """02_pseudo's round-0 labels (its propagation labeler on the centred embeddings, 30 seeds, as
    the stage computes them) scored on the truth file."""
    emb = run.embed(data.images).astype(np.float32)
    ctx = LabelingContext(center_normalize(emb) if cfg.pseudo.center else emb, data.labeled_idx,
                          data.class_ids[data.labeled_idx], data.n_classes, cfg.pseudo)
    probs = LABELERS.get("propagation")(ctx)
    rows, labels = truth_rows(data, cfg.data.truth)
    return round(float((probs[rows].argmax(1) == labels).mean()), 4)

if __name__ == "__main__":
    main()
