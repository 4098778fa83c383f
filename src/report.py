"""One static HTML page per run (``paths.report_dir/index.html``, opens from disk, no server) with
PNG plots: a t-SNE map of the embeddings (van der Maaten & Hinton 2008) coloured by pseudo-label
and by truth, the confusion matrix of the submitted predictions against the truth file, the local
CV of every member with its interval, the training curves of every stage's ``log.jsonl``, the
duplicate-image findings of stage 00, and the near-duplicate pairs (hashes of stage 00, embeddings
of stage 05) with a grid of the most similar pairs."""
from __future__ import annotations

import html
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src import io  # noqa: E402
from src.paths import STAGE_DIRS, RunPaths  # noqa: E402

CURVE_STAGES = ("ssl", "pseudo", "metric", "meta")  # stages whose log.jsonl holds training curves
X_KEYS = ("step", "iteration", "iter", "episode", "epoch", "round")  # first present: the x axis
MAX_CURVES = 8  # panels per stage


def _save(fig, path: Path) -> str:
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return path.name


def tsne_plot(out: Path, x: np.ndarray, rows: np.ndarray, colour_sets: list[tuple[str, np.ndarray]],
              labeled_mask: np.ndarray, class_names: list, seed: int = 0) -> str:
    """t-SNE of x[rows] (PCA to 50 dimensions first); one panel per (title, class id per row, -1 =
    unknown, drawn grey). Labeled images are drawn as black-edged stars."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z = np.asarray(x[rows], np.float32)
    if z.shape[1] > 50:
        z = PCA(50, random_state=seed).fit_transform(z)
    with threadpool_limits(1):  # ~2k points: OpenMP threads only add contention (5x slower on a busy host)
        xy = TSNE(2, perplexity=min(30.0, max(2.0, (len(z) - 1) / 3)), init="pca", max_iter=300,
                  random_state=seed).fit_transform(z)
    fig, axes = plt.subplots(1, len(colour_sets), figsize=(6 * len(colour_sets), 5.5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, (title, c) in zip(axes[0], colour_sets):
        known = c >= 0
        ax.scatter(xy[~known, 0], xy[~known, 1], s=3, c="#cccccc", linewidths=0)
        ax.scatter(xy[known, 0], xy[known, 1], s=4, c=cmap(c[known] % cmap.N), linewidths=0)
        star = labeled_mask & known
        ax.scatter(xy[star, 0], xy[star, 1], s=90, marker="*", c=cmap(c[star] % cmap.N), edgecolors="k",
                   linewidths=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=str(n))
               for i, n in enumerate(class_names)]
    axes[0][-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, out)


def confusion_plot(out: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list, title: str) -> str:
    n = len(class_names)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 1 + 0.45 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90)
    ax.set_yticks(range(n), [str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    return _save(fig, out)


def cv_plot(out: Path, rows: dict[str, dict]) -> str:
    """rows: name -> {"accuracy", "interval", "test_accuracy" (optional)}: LOO accuracy with its
    Wilson interval, and the truth accuracy as a red diamond."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ypos = np.arange(len(names))[::-1]
    acc = np.array([rows[n]["accuracy"] for n in names])
    lo = np.array([rows[n]["interval"][0] for n in names])
    hi = np.array([rows[n]["interval"][1] for n in names])
    ax.errorbar(acc, ypos, xerr=[acc - lo, hi - acc], fmt="o", color="C0", capsize=3, label="local CV (95% CI)")
    test = [(y, rows[n]["test_accuracy"]) for y, n in zip(ypos, names) if rows[n].get("test_accuracy") is not None]
    if test:
        ax.scatter([t for _, t in test], [y for y, _ in test], marker="D", color="C3", zorder=3, label="truth accuracy")
    ax.set_yticks(ypos, names)
    ax.set_xlabel("accuracy")
    left = min([lo.min()] + [t for _, t in test])
    ax.set_xlim(max(0.0, left - 0.05), 1.0)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out)


def _flatten(record: dict, prefix: str = "") -> dict:
    """{"loss": 1, "parts": {"simclr": 1}} -> {"loss": 1, "parts.simclr": 1}."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def curve_plot(out: Path, records: list[dict], title: str) -> str | None:
    """Training curves from a JSON-lines log: every numeric key against the log's step key (step,
    epoch, iteration, ...), one line per value of its grouping keys (string keys such as "method",
    and other step-like keys such as "round"). Records without the step key (summaries) are skipped.
    Losses and accuracies come first; at most MAX_CURVES panels."""
    records = [_flatten(r) for r in records]
    xkey = next((k for k in X_KEYS if any(k in r for r in records)), None)
    if xkey is None:
        return None
    # (key, group) -> ([x], [y]); group: the record's string values and other step-like values
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        x = r.get(xkey)
        if not _is_number(x):
            continue
        group = " ".join(f"{k}={v}" for k, v in r.items()
                         if isinstance(v, str) or (k in X_KEYS and k != xkey and _is_number(v)))
        for k, v in r.items():
            if k in X_KEYS or k == "seconds" or not _is_number(v):
                continue
            xs, ys = series.setdefault(k, {}).setdefault(group, ([], []))
            xs.append(x)
            ys.append(v)
    keys = [k for k, groups in series.items() if any(len(xs) >= 2 for xs, _ in groups.values())]
    keys.sort(key=lambda k: (0 if "loss" in k else 1 if "acc" in k else 2))
    keys = keys[:MAX_CURVES]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        for group, (xs, ys) in series[k].items():
            ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 30 else None, label=group or None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(xkey, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series[k]) > 1:
            ax.legend(fontsize=6)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(paths: RunPaths, title: str, cv_rows: dict[str, dict], class_names: list,
                  embeddings: np.ndarray | None = None, tsne_rows: np.ndarray | None = None,
                  tsne_colours: list[tuple[str, np.ndarray]] | None = None, labeled_mask: np.ndarray | None = None,
                  confusion: tuple[np.ndarray, np.ndarray, str] | None = None, summary_lines: list[str] = (),
                  seed: int = 0, near_duplicate_pairs: int = 24) -> Path:
    """Write the PNGs and index.html into paths.report_dir; returns the HTML path.

    cv_rows: name -> {"accuracy", "interval", "test_accuracy"?, "note"?}; confusion: (truth ids,
    predicted ids, title) over the rows the truth covers."""
    out = paths.report_dir
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    if summary_lines:
        sections.append("<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines) + "</ul>")
    if cv_rows:
        png = cv_plot(out / "cv.png", cv_rows)
        rows = [[n, f"{r['accuracy']:.3f}", f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]",
                 "-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.4f}", r.get("note", "")]
                for n, r in cv_rows.items()]
        sections.append("<h2>Local CV</h2><p>Leave-one-out accuracy over the labeled images with a Wilson 95% "
                        "interval; truth accuracy is scoring only.</p>" + f'<img src="{png}">'
                        + _table(["member", "local CV", "95% CI", "truth accuracy", "note"], rows))
    if embeddings is not None and tsne_rows is not None and tsne_colours:
        png = tsne_plot(out / "tsne.png", embeddings, tsne_rows, tsne_colours, labeled_mask, class_names, seed)
        sections.append(f"<h2>Embedding map (t-SNE, {len(tsne_rows)} images)</h2>"
                        "<p>Stars: labeled images. Grey: no label of that kind.</p>" + f'<img src="{png}">')
    if confusion is not None:
        y_true, y_pred, caption = confusion
        png = confusion_plot(out / "confusion.png", y_true, y_pred, class_names, caption)
        sections.append(f'<h2>Confusion matrix against the truth file</h2><img src="{png}">')
    curves = []
    for stage in CURVE_STAGES:
        records = io.read_jsonl(paths.log(stage))
        if records:
            png = curve_plot(out / f"curves_{stage}.png", records, f"{STAGE_DIRS[stage]} log.jsonl")
            if png:
                curves.append(f'<h3>{STAGE_DIRS[stage]}</h3><img src="{png}">')
    sections.append("<h2>Training curves</h2>" + ("".join(curves) or "<p>No training logs in this run.</p>"))
    sections.append("<h2>Duplicate images (stage 00)</h2>" + _duplicates_html(paths))
    sections.append("<h2>Near-duplicate images</h2>" + _near_duplicates_html(paths, out, near_duplicate_pairs))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "font-size:13px;text-align:left}img{max-width:100%}h2{border-bottom:1px solid #ddd}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            + "".join(sections) + "</body></html>")
    return io.write_text(out / "index.html", page)


def pairs_grid(out: Path, images: np.ndarray, pairs, title: str, per_row: int = 4) -> str:
    """PNG of image pairs side by side: pairs has a, b (rows of `images`), a_id, b_id, a_split,
    b_split and dhash/phash or cosine."""
    n = len(pairs)
    n_rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(n_rows, per_row, figsize=(3.2 * per_row, 2.0 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), pairs.itertuples()):
        a, b = np.asarray(images[int(p.a)]), np.asarray(images[int(p.b)])
        gap = np.full((a.shape[0], 2, 3), 255, np.uint8)
        ax.imshow(np.concatenate([a, gap, b], axis=1), interpolation="nearest")
        score = f"cos {p.cosine:.3f}" if hasattr(p, "cosine") else f"dHash {p.dhash}, pHash {p.phash} bits"
        ax.set_title(f"{p.a_id} ({p.a_split})\n{p.b_id} ({p.b_split})\n{score}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _near_duplicates_html(paths: RunPaths, out: Path, n_pairs: int) -> str:
    import pandas as pd

    from src.data.near_duplicates import top_pairs

    parts, images = [], None
    for stage, what in (("prepare", "perceptual hashes (00_prepare)"), ("heads", "embeddings (05_heads)")):
        if not paths.near_duplicates(stage).exists():
            continue
        s = io.read_json(paths.near_duplicates(stage))
        rows = [["pairs (pixel-identical)", f"{s['pairs']} ({s['identical_pairs']})"],
                ["pairs within one split", s["pairs_within_split"]], ["pairs across splits", s["pairs_across_splits"]],
                ["groups (images)", f"{s['groups']} ({s['images']})"],
                ["groups within one split", s["groups_within_split"]],
                ["groups across splits", s["groups_across_splits"]],
                ["groups with conflicting labels", s["label_conflicts"]],
                ["labeled-test pairs", s["labeled_test_pairs"]], ["seconds", s["seconds"]]]
        parts.append(f"<h3>{html.escape(what)}: {html.escape(str(s['threshold']))}</h3>"
                     + _table(["finding", "value"], rows))
        pairs_path = paths.near_duplicate_pairs(stage)
        if n_pairs and pairs_path.exists():
            pairs = pd.read_csv(pairs_path, dtype={"a_id": str, "b_id": str}, keep_default_na=False)
            if len(pairs):
                images = io.read_npy(paths.images, mmap=True) if images is None else images
                top = top_pairs(pairs, images, n_pairs)
                if len(top):
                    png = pairs_grid(out / f"near_duplicates_{stage}.png", images, top,
                                     f"most similar pairs that are not pixel-identical: {what}")
                    parts.append(f'<img src="{png}">')
    return "".join(parts) or "<p>No near-duplicate search in this run (dedup.hash, dedup.embedding).</p>"


def _duplicates_html(paths: RunPaths) -> str:
    if not paths.data_report.exists():
        return "<p>No data report (run 00_prepare).</p>"
    d = io.read_json(paths.data_report).get("duplicates", {})
    rows = [["groups of identical images", d.get("groups", 0)], ["images in them", d.get("images", 0)],
            ["within one split", d.get("within_split", {})], ["across splits", d.get("across_splits", {})],
            ["groups with conflicting labels", d.get("label_conflicts", 0)]]
    examples = d.get("examples", [])[:10]
    listed = "; ".join(", ".join(map(str, e)) for e in examples)
    extra = f"<p>Examples: {html.escape(listed)}</p>" if examples else ""
    return _table(["finding", "value"], rows) + extra
