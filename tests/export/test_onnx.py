"""export/onnx.py: the segmenters' softmax written out, the same probabilities as torch's, and no Softmax over the
class axis in the exported graph (ONNX Runtime's CPU runs that one several times slower)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs the training extra (torch)")
onnx = pytest.importorskip("onnx")

from leukoedge.export.onnx import class_probabilities, export_segmenter  # noqa: E402


def test_class_probabilities_are_torchs_softmax_over_the_class_axis() -> None:
    logits = torch.from_numpy(np.random.default_rng(0).normal(0.0, 30.0, (2, 3, 8, 9)).astype(np.float32))
    probabilities = class_probabilities(logits)
    torch.testing.assert_close(probabilities, logits.softmax(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 8, 9), atol=1e-6, rtol=0)
    # Large logits do not overflow: the maximum is taken off first.
    assert torch.isfinite(class_probabilities(logits * 100)).all()


def test_an_exported_segmenter_has_no_softmax_over_its_class_axis(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)).eval()
    inputs = np.random.default_rng(1).normal(0.0, 1.0, (2, 3, 16, 20)).astype(np.float32)
    parity = export_segmenter(segmenter, inputs, tmp_path / "segmenter.onnx")
    assert parity < 1e-5
    graph = onnx.load(tmp_path / "segmenter.onnx").graph
    assert not [node for node in graph.node if node.op_type == "Softmax"]
    assert {"ReduceMax", "Exp", "ReduceSum", "Div"} <= {node.op_type for node in graph.node}


def test_an_exported_model_carries_no_stack_trace_of_the_machine_that_exported_it(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 1)).eval()
    export_segmenter(segmenter, np.zeros((2, 3, 8, 8), np.float32), tmp_path / "segmenter.onnx")
    keys = {prop.key for node in onnx.load(tmp_path / "segmenter.onnx").graph.node for prop in node.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "namespace" in keys  # where each node came from, as module names
