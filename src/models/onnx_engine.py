"""ONNX Runtime as the CPU inference engine of the encoder's embedding passes (``ssl.embed_engine``).

On EfficientNet-Lite0 it ran 3x the images/s of eager PyTorch in channels_last (fp32, 2 cores;
``bench.py extract``, docs/RESULTS.md "Feature extraction engines"). The encoder, resize included, is
exported once to ONNX (batch axis dynamic) and run by an :class:`OnnxRuntimeEncoder`, a drop-in for
the encoder in :func:`src.models.encoder.embed`: normalised float32 (B, 3, H, W) in, (B, D) out.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text[:limit]


def export_onnx(model: nn.Module, image_size: int, path: Path) -> dict:
    """ONNX file of `model` for (batch, 3, image_size, image_size) float32 input, batch axis dynamic.
    torch's dynamo exporter at its own opset; the TorchScript exporter at opset 17 if that fails."""
    t0 = time.perf_counter()
    example = torch.randn(2, 3, image_size, image_size, device=next(model.parameters()).device)
    names = {"input_names": ["images"], "output_names": ["features"]}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            exporter = "dynamo"
        except Exception as first:  # noqa: BLE001 - fall back to the TorchScript exporter
            try:
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, **names)
                exporter = "torchscript"
            except Exception as second:  # noqa: BLE001
                raise RuntimeError(f"ONNX export failed: dynamo: {short_error(first)}; "
                                   f"torchscript: {short_error(second)}") from None
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    opset = max((o.version for o in imports if o.domain in ("", "ai.onnx")), default=0)
    return {"path": path, "exporter": exporter, "opset": opset, "seconds": time.perf_counter() - t0}


def cpu_session(path: Path, threads: int):
    """ONNX Runtime session on the CPU: `threads` intra-op threads, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEncoder(nn.Module):
    """The encoder exported to `path` and run by ONNX Runtime: forward(x (B, 3, H, W)) -> (B, D)
    float32 on the CPU. Built from an encoder in eval mode; it has no parameters of its own."""

    def __init__(self, encoder: nn.Module, image_size: int, path: Path):
        super().__init__()
        was_training = encoder.training
        encoder.eval()
        self.export = export_onnx(encoder, image_size, path)
        encoder.train(was_training)
        self.session = cpu_session(path, torch.get_num_threads())
        self.input = self.session.get_inputs()[0].name
        self.dim = getattr(encoder, "dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().contiguous().numpy())  # NCHW float32
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])
