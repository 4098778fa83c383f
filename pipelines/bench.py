"""Benchmarks: python pipelines/bench.py <what> -c CONFIG [section.key=value ...] [options]

    python pipelines/bench.py ssl -c configs/cifar_gpu.yaml       # SSL step: views/s, GFLOP/s, memory, epoch time
    python pipelines/bench.py pipeline -c configs/cifar_gpu.yaml  # every stage: time, memory, views/s, CV, truth
    python pipelines/bench.py transductive -c configs/demo.yaml run.name=demo   # vs easyfsl / sklearn
    python pipelines/bench.py lightly -c configs/cifar_cpu.yaml --seconds 300   # vs lightly's SimCLR
    python pipelines/bench.py extract -c configs/cifar_cpu_pretrained.yaml --sizes 96,160,224   # encoder images/s per engine

Each benchmark is one entry of BENCHES: "module:function", where the function takes
(cfg, args) and the module may define add_arguments(parser) for its own options."""
import _bootstrap  # noqa: F401

import argparse
import importlib

from src.cli import guarded
from src.config import load_config

BENCHES = {
    "ssl": ("src.ssl.bench:bench_ssl", "SSL training step: augmented views/s, GFLOP/s vs the matmul roof, memory"),
    "pipeline": ("src.pipeline_bench:bench_pipeline",
                 "every stage from a clean run: wall time, peak RSS / GPU memory, SSL GFLOP/s, local CV, truth"),
    "transductive": ("src.transductive.bench:bench_transductive",
                     "transductive heads vs easyfsl and scikit-learn on a run's embeddings: accuracy, seconds"),
    "lightly": ("src.ssl.bench_lightly:bench_lightly",
                "our SimCLR beside lightly's (requirements-bench.txt) at equal wall time: views/s and kNN probe"),
    "extract": ("src.models.bench_extract:bench_extract",
                "encoder feature extraction per engine (torch eager/NHWC/bf16/compile, ONNX Runtime, OpenVINO), "
                "input size and batch: images/s, GFLOP/s"),
}


def _target(name):
    module, function = BENCHES[name][0].split(":")
    mod = importlib.import_module(module)
    return mod, getattr(mod, function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="what")
    for name, (_, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", help="experiment YAML in configs/")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, type-checked")
        try:
            mod, _ = _target(name)
        except ImportError as exc:  # a bench whose package this machine lacks must not break the others
            p.description = f"unavailable here: {exc}"
            continue
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    guarded(lambda: _target(args.what)[1](load_config(args.config, args.overrides), args) and None)
