"""Micro-benchmark behind src/transductive/core.py's row_max / row_sum: numpy's class-axis reductions
against the column-wise paths, on (60,000, C) float32 (ms per call, best of 5 x 20 calls).

    python scripts/row_reductions.py
"""
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.transductive.core import NARROW, column_max  # noqa: E402


def ms(fn):
    return min(timeit.repeat(fn, number=20, repeat=5)) / 20 * 1e3


print(f"NARROW = {NARROW}\n| C | z.max(1) | column maxima | z.sum(1) | z @ ones |\n| --- | --- | --- | --- | --- |")
for c in (2, 10, 16, 32, 100):
    z = np.random.default_rng(c).random((60000, c), dtype=np.float32)
    ones = np.ones(c, np.float32)
    print(f"| {c} | {ms(lambda: z.max(1)):.2f} | {ms(lambda: column_max(z)):.2f} | {ms(lambda: z.sum(1)):.2f} "
          f"| {ms(lambda: z @ ones):.2f} |")
