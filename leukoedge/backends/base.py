"""The one inference interface every backend implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs one model: named float32 inputs in, named outputs out. Detector never knows which backend it has."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
