"""Regenerate tests/data/torch_names_after_2_11.txt: Python names in torch's public surfaces
(the modules this project touches: torch, torch.nn, optim, amp, cuda, autograd, utils.data,
flop_counter, _python_dispatch, _pytree, distributed, backends, compiler) that the installed torch
has and torch 2.11 (the device's) has nowhere in its Python sources or stubs.
tests/test_torch_compat.py fails when src/ or pipelines/ use one of them.

    pip download --no-deps --only-binary=:all: -d /tmp/t211 torch==2.11.0    # ~530 MB, read only
    python scripts/torch_api_diff.py /tmp/t211/torch-2.11.0-*.whl > tests/data/torch_names_after_2_11.txt

Names are NAME tokens of the code (comments and strings excluded), so a name counts as present in
2.11 if any 2.11 module mentions it; the list errs towards missing an addition, never towards
flagging a name 2.11 has."""
import io
import sys
import tokenize
import zipfile
from pathlib import Path

import torch

PUBLIC = ["__init__.py", "_tensor.py", "functional.py", "_C/__init__.pyi", "_C/_VariableFunctions.pyi", "_C/_nn.pyi",
          "nn/**/*.py", "optim/*.py", "amp/*.py", "cuda/*.py", "autograd/*.py", "utils/flop_counter.py",
          "utils/_python_dispatch.py", "utils/_pytree.py", "utils/data/*.py", "utils/data/**/*.py", "distributed/*.py",
          "distributed/nn/*.py", "distributed/algorithms/*.py", "backends/**/*.py", "random.py", "serialization.py",
          "_compile.py", "compiler/*.py", "_dynamo/__init__.py", "overrides.py", "types.py", "library.py"]


def names(source: str) -> set[str]:
    out = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                out.add(tok.string)
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def main(wheel: str) -> None:
    old: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith("torch/") and n.endswith((".py", ".pyi")):
                old |= names(z.read(n).decode("utf-8", "replace"))
    root = Path(torch.__file__).parent
    public: set[str] = set()
    for pattern in PUBLIC:
        for p in root.glob(pattern):
            public |= names(p.read_text("utf-8", "replace"))
    print(f"# names in torch {torch.__version__}'s public modules that torch 2.11 ({Path(wheel).name}) lacks;")
    print("# made by scripts/torch_api_diff.py, read by tests/test_torch_compat.py")
    print("\n".join(sorted(public - old)))


if __name__ == "__main__":
    main(sys.argv[1])
