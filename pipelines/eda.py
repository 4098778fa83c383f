"""Near-duplicate search on a prepared run (EDA), outside the stage runner: perceptual hashes of
00_prepare's cached images, and with --embeddings the embeddings a stage wrote. Prints the counts
within and across splits and the time of each pass; writes runs/<run>/eda/near_duplicates.json
(+ near_duplicate_pairs.csv; with --embeddings: near_duplicates_embedding.json / ..._embedding.csv).

    python pipelines/eda.py -c configs/cifar_gpu.yaml                      # hashes (dedup.* keys)
    python pipelines/eda.py -c configs/cifar_gpu.yaml --embeddings ssl dedup.embedding_cosine=0.97"""
import _bootstrap  # noqa: F401

from src.cli import config_parser, guarded
from src.config import load_config


def main(cfg, embeddings: str = "") -> dict:
    import numpy as np

    from src import io
    from src.data import load_data, near_duplicates
    from src.errors import UserError
    from src.paths import RunPaths
    from src.runtime import resolve_device

    paths = RunPaths(cfg)
    data = load_data(paths)
    index = data.index.assign(label=data.class_ids)
    out = {}
    pairs, summary = near_duplicates.find(data.images, index, cfg.dedup.hash_distance, cfg.dedup.neighbors)
    io.write_csv(paths.near_duplicate_pairs("eda"), near_duplicates.pair_table(pairs, index))
    io.write_json(paths.near_duplicates("eda"), summary)
    print(near_duplicates.format_summary(summary))
    out["hash"] = summary
    if embeddings:
        path = paths.embeddings(embeddings)
        if not path.exists():
            raise UserError(f"{path}: --embeddings {embeddings}: that stage wrote no embeddings")
        emb = io.read_npy(path).astype(np.float32)
        pairs, summary = near_duplicates.find_by_embedding(emb, data.images, index, cfg.dedup.embedding_cosine,
                                                           cfg.dedup.neighbors, resolve_device(cfg.run.device))
        io.write_csv(paths.near_duplicate_pairs("eda", "_embedding"), near_duplicates.pair_table(pairs, index))
        io.write_json(paths.near_duplicates("eda", "_embedding"), summary)
        print(near_duplicates.format_summary(summary))
        out["embedding"] = summary
    return out


if __name__ == "__main__":
    parser = config_parser(__doc__)
    parser.add_argument("--embeddings", default="", choices=["", "ssl", "pseudo", "metric"],
                        help="also search this stage's embeddings (cosine)")
    args = parser.parse_args()
    guarded(lambda: main(load_config(args.config, args.overrides), args.embeddings) and None)
