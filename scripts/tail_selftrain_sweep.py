"""Self-training the last stage of a frozen ImageNet EfficientNet-Lite0 on a 2-core CPU, measured on
a finished run of configs/cifar_cpu_pretrained.yaml (docs/RESULTS.md, "Pretrained EfficientNet-Lite
features"). A research harness, not a stage: it tells whether the step pays before it joins the recipe.

    python scripts/tail_selftrain_sweep.py -c configs/cifar_cpu_pretrained.yaml run.name=RUN [--epochs 3] [--lr 3e-4]

RUN must have its 01_ssl and 02_pseudo. Steps:
1. The trunk (stem and stages 1-6 of Lite0 at 224, the resize included) is exported to ONNX once
   and run over every prepared image and its mirror; its (N, 2, 192, 7, 7) maps are cached in
   runs/<RUN>/sweep/lite0_trunk.npy (float16). The tail, stage 7 + conv_head + BN + pool (~0.1 of
   the 0.77 GFLOP per image), runs in PyTorch.
2. The tail and a cosine classifier (class-mean initialised) train on the labeled images and
   02_pseudo's selected pseudo-labels: cross-entropy with label smoothing 0.1, the tail's BatchNorm
   statistics frozen, each map flipped at random, cropped to 5-7 cells and resized back, and
   channel-dropped (p 0.2); AdamW, cosine schedule.
3. After each epoch, the Lite0 block is embedded again (flip-averaged, ssl.embed_power) and joined
   to the run's other blocks as 01_ssl joins them; label propagation and logistic regression on its
   labels (the 05_heads pieces) are scored on the truth file.
The truth file only scores; nothing above reads it. One JSON line per epoch goes to stdout and
runs/<RUN>/sweep/tail_selftrain.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from src.config import load_config  # noqa: E402
from src.data.dataset import load_data  # noqa: E402
from src.heads import HEADS  # noqa: E402
from src.models.encoder import Encoder, source_backbone, to_input  # noqa: E402
from src.models.onnx_engine import cpu_session, export_onnx  # noqa: E402
from src.paths import RunPaths  # noqa: E402
from src.probe import truth_rows  # noqa: E402
from src.pseudo.labelers import LABELERS, LabelingContext  # noqa: E402
from src.pseudo.selection import pseudo_label  # noqa: E402
from src.ssl.trainer import concat_blocks  # noqa: E402
from src.transductive import center_normalize, power_transform  # noqa: E402

CUT = 6  # the trunk runs stages blocks[:CUT]; the tail blocks[CUT:] + conv_head + bn2 + pool


class Trunk(nn.Module):
    """Normalised (B, 3, 32, 32) -> (B, 192, 7, 7): the encoder's input map and resize, stem, stages 1-6."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        if e.in_scale is not None:
            x = x * e.in_scale + e.in_shift
        x = F.interpolate(x, size=(e.input_size, e.input_size), mode="bilinear", align_corners=False)
        x = e.net.bn1(e.net.conv_stem(x))
        for block in e.net.blocks[:CUT]:
            x = block(x)
        return x


def tail(net: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """(B, 192, 7, 7) -> (B, 1280) pooled features."""
    for block in net.blocks[CUT:]:
        maps = block(maps)
    return net.global_pool(net.bn2(net.conv_head(maps)))


def trunk_maps(encoder: Encoder, images: np.ndarray, cache: Path) -> np.ndarray:
    """(N, 2, C, h, w) float16 trunk maps of every image and its mirror, through ONNX Runtime."""
    if not cache.exists():
        onnx = cache.with_suffix(".onnx")
        export_onnx(Trunk(encoder).eval(), images.shape[1], onnx)
        session = cpu_session(onnx, torch.get_num_threads())
        first = session.run(None, {"images": to_input(torch.from_numpy(np.array(images[:1]))).numpy()})[0]
        out = np.lib.format.open_memmap(cache.with_suffix(".part.npy"), mode="w+", dtype=np.float16,
                                        shape=(len(images), 2, *first.shape[1:]))
        for s in range(0, len(images), 64):
            x = to_input(torch.from_numpy(np.array(images[s:s + 64])))
            for f, view in enumerate((x, torch.flip(x, dims=[3]))):
                out[s:s + 64, f] = session.run(None, {"images": view.numpy()})[0]
        out.flush()
        del out
        cache.with_suffix(".part.npy").rename(cache)
    return np.load(cache)


def embed_tail(net: nn.Module, maps: torch.Tensor, power: float) -> np.ndarray:
    """Flip-averaged, power-transformed (N, 1280) features, as 01_ssl's embed computes them."""
    net.eval()
    with torch.no_grad():
        feats = np.concatenate([(tail(net, m[:, 0].float()) + tail(net, m[:, 1].float())).numpy()
                                for m in maps.split(512)])
    return power_transform(feats, power) if power != 1.0 else feats


def score(cfg, data, block: np.ndarray, others: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> dict:
    """Propagation and logistic regression on its labels (02_pseudo's and 05_heads' pieces) over
    [Lite0 | other blocks], and propagation on the Lite0 block alone: accuracy on the truth rows."""
    lab, ly, n, unl = data.labeled_idx, data.class_ids[data.labeled_idx], data.n_classes, data.unlabeled_idx
    out = {}
    for tag, x in (("cat", concat_blocks([block, others]) if others.size else block), ("l0", block)):
        x = center_normalize(x)
        prop = LABELERS.get("propagation")(LabelingContext(x, lab, ly, n, cfg.pseudo))
        out[f"{tag}_prop"] = round(float((prop[rows].argmax(1) == truth).mean()), 4)
        if tag == "cat":
            pseudo = pseudo_label({"propagation": prop[unl]}, cfg.pseudo)
            support = np.concatenate([lab, unl[pseudo.selected]])
            support_y = np.concatenate([ly, pseudo.label[pseudo.selected]])
            probs = HEADS.get("logreg")(cfg.heads).fit(x[support], support_y, n).predict_proba(x[rows])
            out["cat_logreg"] = round(float((probs.argmax(1) == truth).mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4, help="tail; the classifier gets 10x")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--labeled-repeat", type=int, default=20, help="copies of the labeled rows per epoch")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    if not cfg.data.truth:
        sys.exit("error: data.truth: the sweep scores on a truth file")
    torch.manual_seed(cfg.run.seed)
    paths = RunPaths(cfg)
    data = load_data(paths)
    rows, truth = truth_rows(data, cfg.data.truth)
    folder = paths.run / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    backbone, side = source_backbone("efficientnet_lite0")
    encoder = Encoder(backbone, cfg.data.image_size, cfg.data.model_input_size or side).eval().requires_grad_(False)
    net = encoder.net
    t0 = time.perf_counter()
    maps = torch.from_numpy(trunk_maps(encoder, data.images, folder / "lite0_trunk.npy"))
    record = {"trunk_s": round(time.perf_counter() - t0, 1)}
    emb = np.asarray(np.load(paths.embeddings("ssl")), np.float32)
    others = emb[:, net.num_features:]  # the extra encoders' blocks (scaled copies: concat_blocks renormalises)
    power = cfg.ssl.embed_power
    t0 = time.perf_counter()
    block = embed_tail(net, maps, power)
    record["embed_s"] = round(time.perf_counter() - t0, 1)
    log = folder / "tail_selftrain.jsonl"

    def emit(extra: dict) -> None:
        line = json.dumps({**extra, **score(cfg, data, block, others, rows, truth)})
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")

    emit({"epoch": 0, **record})
    labels = pd.read_csv(paths.pseudo_labels())
    labels = labels[labels["selected"]]
    row_of = {image_id: r for r, image_id in enumerate(data.index["image_id"])}
    prow = np.array([row_of[i] for i in labels["image_id"]], np.int64)
    py = data.encode(labels["label"].tolist(), str(paths.pseudo_labels()))
    lab, ly = data.labeled_idx, data.class_ids[data.labeled_idx]
    train_rows = np.concatenate([prow] + [lab] * args.labeled_repeat)
    train_y = torch.from_numpy(np.concatenate([py] + [ly] * args.labeled_repeat))
    with torch.no_grad():  # cosine classifier, initialised at the class means of the frozen block
        f = F.normalize(torch.from_numpy(block[prow]), dim=1)
        means = torch.stack([f[torch.from_numpy(py == c)].mean(0) for c in range(data.n_classes)])
    classifier = nn.Parameter(F.normalize(means, dim=1))
    tail_modules = [*net.blocks[CUT:], net.conv_head, net.bn2]
    params = [p for m in tail_modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": params, "lr": args.lr}, {"params": [classifier], "lr": args.lr * 10}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    base = [g["lr"] for g in opt.param_groups]
    per_epoch = math.ceil(len(train_rows) / args.batch)
    total, step, train_s = args.epochs * per_epoch, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        for m in tail_modules:
            m.train()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # statistics frozen: the batch is pseudo-labeled and augmented
        t0, running = time.perf_counter(), torch.zeros(())
        for batch in torch.randperm(len(train_rows)).split(args.batch):
            r = torch.from_numpy(train_rows[batch.numpy()])
            x = maps[r, torch.randint(0, 2, (len(r),))].float()  # (B, 192, 7, 7), a random mirror
            side_ = x.shape[-1]
            crop = int(torch.randint(side_ - 2, side_ + 1, (1,))) if side_ >= 5 else side_
            if crop < side_:
                i, j = (int(v) for v in torch.randint(0, side_ - crop + 1, (2,)))
                x = F.interpolate(x[:, :, i:i + crop, j:j + crop], size=(side_, side_), mode="bilinear",
                                  align_corners=False)
            x = F.dropout(x, 0.2)
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = 10.0 * F.normalize(tail(net, x), dim=1) @ F.normalize(classifier, dim=1).T  # (B, C)
            loss = F.cross_entropy(logits, train_y[batch], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            step += 1
        train_s += time.perf_counter() - t0
        block = embed_tail(net, maps, power)
        emit({"epoch": epoch, "loss": round(float(running) / per_epoch, 4), "train_s": round(train_s, 1),
              "pseudo_rows": int(len(prow))})


if __name__ == "__main__":
    main()
