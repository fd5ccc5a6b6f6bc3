"""ONNX export of the fused model with a real dynamic batch axis.

The graph takes ``images`` uint8 ``[batch, S, S, 3]`` and returns the ``Outputs`` fields by
name, so ONNX Runtime and TensorRT bind inputs and outputs by the same names as torch.
The export is traced at batch 1 and checked with ``onnx.checker``; tests run it at other
batch sizes against torch, which is what proves the batch axis is real.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lineguard.engines.errors import ConfigError
from lineguard.engines.model import CSADModel, Outputs

INPUT_NAME = "images"
OUTPUT_NAMES = tuple(Outputs._fields[:3])  # every graph has these
FEATURES_NAME = "patch_features"  # only a graph whose patch bank is searched after it


def output_names(model: CSADModel) -> tuple[str, ...]:
    searched_outside = model.patch_knn is not None and model.config.patch_search != "graph"
    return OUTPUT_NAMES + ((FEATURES_NAME,) if searched_outside else ())


MIN_OPSET = 17


def export_onnx(model: CSADModel, path: str | Path, *, opset: int = MIN_OPSET) -> Path:
    """Write ``model`` as ONNX at ``path`` (fp32, dynamic batch) and check it."""
    import onnx

    if opset < MIN_OPSET:
        raise ConfigError(f"ONNX opset {opset} is too old: use {MIN_OPSET} or newer")
    path = Path(path)
    h, w = model.config.input_size
    example = torch.zeros(1, h, w, 3, dtype=torch.uint8)
    outputs = output_names(model)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is the one that keeps a symbolic batch through every
            # op we use; silence its deprecation notice rather than the user's console.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(path), full_check=True)
    return path
