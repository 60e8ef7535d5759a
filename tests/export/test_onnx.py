"""export/onnx.py: the segmenters' softmax written out, the same probabilities as torch's, and no Softmax over the
class axis in the exported graph (ONNX Runtime's CPU runs that one several times slower); no convolution over a channel
count off ONNX Runtime's blocked fast path (split_channel_concats), no upsampling by computed sizes (constant_resize_scales),
no reduction over a few classes' axis (split_class_reductions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs the training extra (torch)")
onnx = pytest.importorskip("onnx")

from leukoedge.export.onnx import (  # noqa: E402
    class_probabilities,
    constant_resize_scales,
    export_onnx,
    export_segmenter,
    on_blocked_path,
    split_channel_concats,
    split_class_reductions,
)


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
    # written out, its reductions over the three classes split apart (split_class_reductions)
    assert {"Split", "Max", "Exp", "Sum", "Div"} <= {node.op_type for node in graph.node}
    assert not [node for node in graph.node if node.op_type in ("ReduceMax", "ReduceSum")]


def test_an_exported_model_carries_no_stack_trace_of_the_machine_that_exported_it(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 1)).eval()
    export_segmenter(segmenter, np.zeros((2, 3, 8, 8), np.float32), tmp_path / "segmenter.onnx")
    keys = {prop.key for node in onnx.load(tmp_path / "segmenter.onnx").graph.node for prop in node.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "namespace" in keys  # where each node came from, as module names


class _ImageEnd(torch.nn.Module):
    """A segmenter's full-resolution end as the shipped ones have it: features upsampled, concatenated with the image
    (16 + 3 channels), then a dense conv (hctnet_lite, mobile_unet_field_dense) or a depthwise-separable one (mobile_unet)."""

    def __init__(self, separable: bool):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        if separable:
            self.end = torch.nn.Sequential(
                torch.nn.Conv2d(19, 19, 3, padding=1, groups=19), torch.nn.BatchNorm2d(19), torch.nn.ReLU(),
                torch.nn.Conv2d(19, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            )
        else:
            self.end = torch.nn.Sequential(torch.nn.Conv2d(19, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(self.end[-3].out_channels, 3, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(self.features(image), size=image.shape[2:], mode="bilinear", align_corners=False)
        return self.head(self.end(torch.cat([x, image], dim=1)))


def _conv_input_channels(path: Path) -> list[int]:
    """The input channel count of every Conv of an ONNX file (its weights' second dimension times its groups)."""
    graph = onnx.load(path).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    counts = []
    for node in graph.node:
        if node.op_type == "Conv":
            group = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
            counts.append(int(weights[node.input[1]].dims[1]) * group)
    return counts


def _off_the_blocked_path(counts: list[int]) -> list[int]:
    return [count for count in counts if not on_blocked_path(count)]


def _blocked_by_onnx_runtime(channels: int, tmp_path: Path) -> bool:
    """Whether this ONNX Runtime puts a dense 3x3 convolution over `channels` input channels on its blocked path (its
    optimized graph holds an NCHWc Conv)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((16, channels, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], [weights],
    )
    source, optimized = tmp_path / f"conv{channels}.onnx", tmp_path / f"conv{channels}.optimized.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return any(node.op_type == "Conv" and "nchwc" in node.domain for node in onnx.load(optimized).graph.node)


def test_the_blocked_path_is_onnx_runtimes(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    if not _blocked_by_onnx_runtime(16, tmp_path):
        pytest.skip("this ONNX Runtime has no blocked (NCHWc) convolutions on this CPU")
    # What on_blocked_path says is on it, ONNX Runtime runs blocked; the image concat's 19 and its like it does not.
    for channels in (3, 8, 12, 16, 20, 24, 32, 40, 56):
        assert on_blocked_path(channels) and _blocked_by_onnx_runtime(channels, tmp_path), channels
    for channels in (17, 19, 30, 35):
        assert not on_blocked_path(channels) and not _blocked_by_onnx_runtime(channels, tmp_path), channels


@pytest.mark.parametrize("separable", [False, True])
def test_the_image_concat_is_split_into_convolutions_on_the_fast_path(tmp_path: Path, separable: bool) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    segmenter = _ImageEnd(separable).eval()
    for module in segmenter.modules():  # batch norms with statistics of their own, so that folding them is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    inputs = np.random.default_rng(2).normal(0.0, 1.0, (3, 3, 24, 32)).astype(np.float32)
    parity = export_segmenter(segmenter, inputs, tmp_path / "segmenter.onnx")  # held against torch after the split
    assert parity < 1e-5
    graph = onnx.load(tmp_path / "segmenter.onnx").graph
    concat_outputs = {node.output[0] for node in graph.node if node.op_type == "Concat"}
    assert not [node for node in graph.node if node.op_type == "Conv" and node.input[0] in concat_outputs]
    counts = _conv_input_channels(tmp_path / "segmenter.onnx")
    assert 19 not in counts and not _off_the_blocked_path(counts)


def test_a_concat_that_no_dense_convolution_reads_is_left_byte_for_byte(tmp_path: Path) -> None:
    class ConcatThenPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.max_pool2d(torch.relu(torch.cat([self.features(x), x], dim=1)), 2)

    path = tmp_path / "model.onnx"
    export_onnx(ConcatThenPool(), torch.zeros(2, 3, 8, 8), path, "image", ["probs"])
    before = path.read_bytes()
    split_channel_concats(path)
    assert path.read_bytes() == before


def test_a_concat_already_on_the_fast_path_is_left_byte_for_byte(tmp_path: Path) -> None:
    class TwoBranches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(32, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    path = tmp_path / "model.onnx"
    export_onnx(TwoBranches(), torch.zeros(2, 3, 8, 8), path, "image", ["probs"])
    before = path.read_bytes()
    split_channel_concats(path)
    assert path.read_bytes() == before
    assert 32 in _conv_input_channels(path)
def _upsampling_inputs(path: Path) -> list[list[str]]:
    return [list(node.input) for node in onnx.load(path).graph.node if node.op_type == "Resize"]


def test_upsampling_by_computed_sizes_becomes_constant_whole_scales_that_onnx_runtime_runs_blocked(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    path = tmp_path / "segmenter.onnx"
    inputs = np.random.default_rng(3).normal(0.0, 1.0, (3, 3, 24, 32)).astype(np.float32)
    assert export_segmenter(_ImageEnd(separable=False).eval(), inputs, path) < 1e-5  # held against torch after the rewrite
    graph = onnx.load(path).graph
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    upsamplings = _upsampling_inputs(path)
    assert upsamplings and all(len(names) == 3 and weights[names[2]].tolist() == [1, 1, 2, 2] for names in upsamplings)
    assert not [node for node in graph.node if node.op_type == "Shape"]  # what computed the sizes is gone
    if not _blocked_by_onnx_runtime(16, tmp_path):
        pytest.skip("this ONNX Runtime has no blocked (NCHWc) layout on this CPU")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    assert [node for node in optimized if node.op_type == "Upsample" and "nchwc" in node.domain]
    assert not [node for node in optimized if node.op_type == "Resize"]


def test_upsampling_to_a_size_that_is_no_whole_multiple_is_left_byte_for_byte(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")

    class BackToNine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)  # 9 -> 5 px

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(self.down(x), size=x.shape[2:], mode="bilinear", align_corners=False)

    path = tmp_path / "model.onnx"
    export_onnx(BackToNine(), torch.zeros(2, 3, 9, 9), path, "image", ["probs"])
    before = path.read_bytes()
    constant_resize_scales(path)
    assert path.read_bytes() == before
    assert all(len(names) == 4 and names[3] for names in _upsampling_inputs(path))  # still by its computed sizes


def test_every_convolution_and_upsampling_of_the_shipped_bundle_is_on_onnx_runtimes_fast_path(tmp_path: Path) -> None:
    # 0.15.0's segmenter and refiner convolved the upsampled features and the image, 16 + 3 channels, in one (split from
    # 0.16.0), upsampled by computed sizes (constant scales from 0.17.0) and reduced over their three classes (split
    # from 0.18.0); no pass finds anything left to do.
    bundle = Path(__file__).resolve().parents[2] / "models" / "default"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for model in ("segmenter", "refiner", "gate", "classifier"):
        shipped = bundle / manifest[model]["file"]
        assert not _off_the_blocked_path(_conv_input_channels(shipped)), model
        assert all(len(names) == 3 for names in _upsampling_inputs(shipped)), model
        copy = tmp_path / shipped.name
        copy.write_bytes(shipped.read_bytes())
        split_channel_concats(copy)
        constant_resize_scales(copy)
        split_class_reductions(copy)
        assert copy.read_bytes() == shipped.read_bytes(), model


def _reductions_graph(channels: int, axes: list[int]) -> "onnx.ModelProto":
    """The written-out softmax of class_probabilities as the exporter writes it: ReduceMax, Sub, Exp, ReduceSum, Div over
    `axes` of an N x channels x 6 x 7 input."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMax", ["logits", "axes"], ["top"], keepdims=1),
        helper.make_node("Sub", ["logits", "top"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["exp"]),
        helper.make_node("ReduceSum", ["exp", "axes"], ["total"], keepdims=1),
        helper.make_node("Div", ["exp", "total"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "softmax",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels, 6, 7])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", channels, 6, 7])],
        [numpy_helper.from_array(np.array(axes, np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_class_reductions_split_apart_give_the_same_probabilities_bit_for_bit(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "softmax.onnx"
    onnx.save(_reductions_graph(3, [1]), path)
    logits = np.random.default_rng(5).normal(0.0, 20.0, (4, 3, 6, 7)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"logits": logits})[0]
    split_class_reductions(path)
    graph = onnx.load(path).graph
    assert [node.op_type for node in graph.node] == ["Split", "Max", "Sub", "Exp", "Split", "Sum", "Div"]
    assert not graph.initializer  # the axes only the reductions read went with them
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"logits": logits})[0]
    assert np.array_equal(after, before)


@pytest.mark.parametrize("channels, axes", [(32, [1]), (3, [2, 3]), (3, [1, 2])])
def test_a_reduction_over_many_channels_or_other_axes_is_left_byte_for_byte(tmp_path: Path, channels: int, axes: list[int]) -> None:
    # e.g. the classifier's spatial attention (the channels' max of 32-96 channels) and its channel attention (over H, W)
    path = tmp_path / "softmax.onnx"
    onnx.save(_reductions_graph(channels, axes), path)
    before = path.read_bytes()
    split_class_reductions(path)
    assert path.read_bytes() == before
