"""The device runs torch 2.11 (CI and this machine: 2.14): no code may use a torch name that 2.11
lacks. tests/data/torch_names_after_2_11.txt lists the names of torch's public modules added after
2.11 (scripts/torch_api_diff.py made it from the 2.11 wheel); every attribute, name imported from
torch and keyword argument in src/ and pipelines/ is checked against it."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "tests" / "data" / "torch_names_after_2_11.txt"
# Our own (or the standard library's) names that happen to be new in torch too.
NOT_TORCH = {"blake2b", "digest_size",  # hashlib
             "_graphs"}  # src/transductive/graph.py: its own cache attribute


def added_after_2_11() -> set[str]:
    return {line.strip() for line in LIST.read_text().splitlines() if line.strip() and not line.startswith("#")}


def used_names(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            out |= {a.name for a in node.names} | set(node.module.split("."))
        elif isinstance(node, ast.Import):
            out |= {part for a in node.names for part in a.name.split(".")}
        elif isinstance(node, ast.Call):
            out |= {k.arg for k in node.keywords if k.arg}
    return out


def test_list_is_a_torch_diff():
    added = added_after_2_11()
    assert len(added) > 500
    # names this project uses that torch 2.11 has: never in the list
    assert not added & {"FlopCounterMode", "TorchDispatchMode", "tree_flatten", "untyped_storage", "autocast",
                        "channels_last", "compile", "max_memory_allocated", "_foreach_copy_", "manual_seed"}


def test_no_name_newer_than_torch_2_11():
    added = added_after_2_11()
    hits = {}
    for folder in ("src", "pipelines", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in sorted(used_names(path) & added - NOT_TORCH):
                hits.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not hits, (f"torch 2.11 (the GPU machine's) lacks {hits}; use an older API, or add the name to "
                      "NOT_TORCH if it is not torch's")
