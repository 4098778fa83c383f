"""Shared fixtures: a tiny competition folder built from the digits data, and an in-process CLI runner."""
from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a shared 2-core machine
    (measured: the SSL tests took 285 s with 2 threads and 28 s with 1 on the busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """A digits competition (1,797 images) built once per test session; copy it before mutating."""
    from src.data.digits import build_digits

    root = tmp_path_factory.mktemp("digits")
    return build_digits(root / "comp", root / "truth.csv", n_test=200, seed=0)


@pytest.fixture
def comp(digits_folder, tmp_path) -> Path:
    """A private, mutable copy of the digits competition."""
    dst = tmp_path / "comp"
    shutil.copytree(digits_folder, dst)
    return dst


class ScriptResult(tuple):
    """(exit status, stderr text), with the captured stdout as `.out`."""

    out: str = ""


def run_script(script: str, *args: str, capsys=None) -> ScriptResult:
    """Run pipelines/<script> in-process as __main__; return (exit status, stderr text) + `.out`."""
    argv = sys.argv
    sys.argv = [script, *args]
    if str(REPO / "pipelines") not in sys.path:
        sys.path.insert(0, str(REPO / "pipelines"))  # as `python pipelines/x.py` would
    code = 0
    try:
        runpy.run_path(str(REPO / "pipelines" / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr() if capsys is not None else None
    result = ScriptResult((code, captured.err if captured else ""))
    result.out = captured.out if captured else ""
    return result
