"""The sweep behind configs/cifar_cpu_pretrained.yaml: one frozen-feature candidate (a pretrained
encoder at one input size, with or without its mirror image) embedded on a prepared run, timed, and
scored with the pipeline's own pieces (docs/RESULTS.md, "Pretrained EfficientNet-Lite features").

    python scripts/pretrained_sweep.py TAG -c configs/cifar_cpu_pretrained.yaml run.name=RUN [overrides...]
    python scripts/pretrained_sweep.py l0_160 -c configs/cifar_cpu_pretrained.yaml run.name=RUN data.model_input_size=160
    python scripts/pretrained_sweep.py l0+l2 -c configs/cifar_cpu_pretrained.yaml run.name=RUN --concat l0_224,l2_260

RUN must have its 00_prepare (`pipelines/00_prepare.py -c ... run.name=RUN`). The embeddings go to
runs/<RUN>/sweep/<TAG>.npy (reused when present, so that --concat and reruns cost no extraction), and
one JSON line per candidate to stdout and runs/<RUN>/sweep/pretrained.jsonl: embedding seconds and
images/s, then accuracy on the truth file of
  protonet, logreg: the 30 labeled images as support (the 05_heads heads, CL2N features);
  prop:             02_pseudo's round-0 propagation labels (its labeler, centred embeddings, 30 seeds);
  prop_logreg:      logistic regression on the labeled images plus 02_pseudo's selected propagation
                    labels (self-training of a light head on confident pseudo-labels);
  prop_logreg_mean: the mean of prop's and prop_logreg's probabilities.
The truth file only scores; nothing above reads it. A research harness, not a stage: the recipe is
the config, and `bench.py pipeline` measures it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from src.config import load_config  # noqa: E402
from src.data.dataset import load_data  # noqa: E402
from src.heads import HEADS  # noqa: E402
from src.models.encoder import Encoder, embed  # noqa: E402
from src.paths import RunPaths  # noqa: E402
from src.probe import truth_rows  # noqa: E402
from src.pseudo.labelers import LABELERS, LabelingContext  # noqa: E402
from src.pseudo.selection import pseudo_label  # noqa: E402
from src.runtime import resolve_cpu_bf16, resolve_device, use_channels_last  # noqa: E402
from src.transductive import center_normalize, l2_normalize  # noqa: E402


def embeddings(cfg, data, device, out: Path) -> tuple[np.ndarray, dict]:
    """(N, D) L2-normalised embeddings of every prepared image, cached at `out`, and their timing."""
    if out.exists():
        return np.load(out), {"cached": True}
    encoder = Encoder(cfg.backbone, cfg.data.image_size, cfg.data.model_input_size).to(device).eval()
    channels_last = use_channels_last(cfg.run.channels_last, device, encoder)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    feats = embed(encoder, data.images, device, cfg.ssl.embed_batch_size, cfg.run.precision,
                  flip_tta=cfg.ssl.embed_flip, channels_last=channels_last,
                  cpu_bf16=resolve_cpu_bf16(cfg.ssl.cpu_precision), power=cfg.ssl.embed_power)
    seconds = time.perf_counter() - t0
    np.save(out, feats.astype(np.float16))
    passes = len(data.images) * (2 if cfg.ssl.embed_flip else 1)
    return feats, {"embed_s": round(seconds, 1), "images_per_s": round(passes / seconds, 1),
                   "cpu_bf16": resolve_cpu_bf16(cfg.ssl.cpu_precision)}


def scores(cfg, data, emb: np.ndarray) -> dict:
    rows, truth = truth_rows(data, cfg.data.truth)
    lab, ly, n = data.labeled_idx, data.class_ids[data.labeled_idx], data.n_classes
    x = center_normalize(emb.astype(np.float32))  # CL2N: what 02_pseudo's labelers see
    out = {}
    for name in ("protonet", "logreg"):
        out[name] = HEADS.get(name)(cfg.heads).fit(x[lab], ly, n).predict_proba(x[rows])
    ctx = LabelingContext(x, lab, ly, n, cfg.pseudo)
    prop = LABELERS.get("propagation")(ctx)  # (N, C)
    unlabeled = data.unlabeled_idx
    pseudo = pseudo_label({"propagation": prop[unlabeled]}, cfg.pseudo)
    sel = unlabeled[pseudo.selected]
    support = np.concatenate([lab, sel])
    support_y = np.concatenate([ly, pseudo.label[pseudo.selected]])
    out["prop"] = prop[rows]
    out["prop_logreg"] = HEADS.get("logreg")(cfg.heads).fit(x[support], support_y, n).predict_proba(x[rows])
    out["prop_logreg_mean"] = out["prop"] / np.maximum(out["prop"].sum(1, keepdims=True), 1e-12) + out["prop_logreg"]
    result = {k: round(float((p.argmax(1) == truth).mean()), 4) for k, p in out.items()}
    result["selected"] = int(len(sel))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tag")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--concat", default="", help="comma-separated tags already embedded: score their concatenation")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    if not cfg.data.truth:
        sys.exit("error: data.truth: the sweep scores candidates on a truth file")
    paths = RunPaths(cfg)
    data, device = load_data(paths), resolve_device(cfg.run.device)
    folder = paths.run / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    if args.concat:
        parts = [np.load(folder / f"{t}.npy").astype(np.float32) for t in args.concat.split(",")]
        emb, timing = l2_normalize(np.concatenate([l2_normalize(p) for p in parts], 1)), {"concat": args.concat}
    else:
        emb, timing = embeddings(cfg, data, device, folder / f"{args.tag}.npy")
    record = {"tag": args.tag, "model": cfg.backbone.name, "size": cfg.data.model_input_size,
              "flip": cfg.ssl.embed_flip, "images": len(data.images), "dim": int(emb.shape[1]), **timing,
              **scores(cfg, data, emb)}
    print(json.dumps(record), flush=True)
    with (folder / "pretrained.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
