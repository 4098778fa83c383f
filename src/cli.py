"""Command-line entry points shared by the scripts in ``pipelines/``.

    python pipelines/01_ssl.py -c configs/demo.yaml ssl.epochs=5 [--force] [--lr-find]

A :class:`~src.errors.UserError` prints ``error: <message>`` on one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from src.config import Config, load_config
from src.errors import EXIT_USER_ERROR, UserError


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", help="experiment YAML in configs/ (defaults otherwise)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, type-checked")
    return parser


def guarded(fn: Callable[[], int | None]) -> None:
    """Run fn; turn UserError into a one-line message and exit status 2."""
    try:
        code = fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def stage_cli(main: Callable[..., dict], description: str = "") -> None:
    """Standard CLI of a numbered stage script: `main(cfg, force=..., lr_find=...)`."""
    parser = config_parser(description or (main.__module__ or ""))
    parser.add_argument("--force", action="store_true", help="rerun even if unchanged")
    parser.add_argument("--lr-find", action="store_true", help="LR range test instead of training")
    args = parser.parse_args()

    def go() -> None:
        cfg: Config = load_config(args.config, args.overrides)
        main(cfg, force=args.force, lr_find=args.lr_find)

    guarded(go)
