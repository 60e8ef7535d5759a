"""Grad-CAM (Selvaraju et al., ICCV 2017) for the bundle's cell classifier.

The heatmaps come from the training checkpoint in PyTorch, not from the exported ONNX model: ONNX
Runtime gives no gradients. The checkpoint is first verified to be the bundle's classifier
(torch_backend.verified_model), and the crops are rebuilt with the runtime's own prepare_crops and the
frame's stain statistics, so a heatmap explains the very input the deployed model classified.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from leukoedge.detector import MAX_CELL_BATCH, Detector
from leukoedge.errors import InvalidFrameError
from leukoedge.frame import validate_frame
from leukoedge.preprocess.cpu import Box, prepare_crops, prepare_frame, square_crop_box
from leukoedge.result import Result, draw_cell_boxes

EXPLAINED_HEAD = "blast"
HEATMAP_ALPHA = 0.5  # weight of the colour map where it is blended over the frame
# Pooling only shrinks the map Grad-CAM needs; the target is the last feature map before it.
POOLING_LAYERS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def grad_cam(model: nn.Module, crops: np.ndarray, head: str = EXPLAINED_HEAD, class_index: int | None = None) -> np.ndarray:
    """Nx3xHxW normalized crops -> NxHxW float32 heatmaps in [0, 1], one per crop, for `class_index`
    of `head` (None: each crop's predicted class).

    The target layer is the last module of model.trunk, other than pooling, that outputs an NxCxhxw
    feature map (custom_cnn: its last ConvBNReLU). Channel weights are the spatially averaged gradients
    of the class logit there; the weighted sum of the channels goes through ReLU, is resized to the crop
    (bilinear) and scaled to [0, 1] per crop (all 0 where the class has no positive evidence).
    """
    if head not in model.heads:
        raise ValueError(f"unknown head {head!r}; the model has {', '.join(model.heads)}")
    model.eval()  # batch norm and dropout as deployed
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _layer, _inputs, output: outputs.append(output))
        for layer in model.trunk.children()
        if not isinstance(layer, POOLING_LAYERS)
    ]
    try:
        with torch.enable_grad():
            # requires_grad on the input keeps a graph even where the weights are frozen.
            logits = model(torch.from_numpy(np.ascontiguousarray(crops, np.float32)).requires_grad_(True))[head]
            feature_map = _last_feature_map(model, outputs)
            classes = _explained_classes(logits, class_index)
            (gradients,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), feature_map)
    finally:
        for hook in hooks:
            hook.remove()
    cam = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * feature_map.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(crops.shape[2:]), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam)).numpy().astype(np.float32)


def _last_feature_map(model: nn.Module, outputs: list[torch.Tensor]) -> torch.Tensor:
    feature_maps = [output for output in outputs if isinstance(output, torch.Tensor) and output.ndim == 4]
    if not feature_maps:
        raise ValueError(f"{type(model).__name__}.trunk has no module outputting an NxCxHxW feature map for Grad-CAM to explain")
    return feature_maps[-1]


def _explained_classes(logits: torch.Tensor, class_index: int | None) -> torch.Tensor:
    if class_index is None:
        return logits.argmax(dim=1)
    if not 0 <= class_index < logits.shape[1]:
        raise ValueError(f"class_index {class_index} is outside the head's {logits.shape[1]} classes")
    return torch.full((logits.shape[0],), class_index, dtype=torch.long)


@dataclass(frozen=True)
class FrameExplanation:
    """Grad-CAM of every cell of one frame, in frame coordinates."""

    heatmap: np.ndarray  # HxW float32 in [0, 1]: the max over the cells' heatmaps, 0 outside every cell's crop
    overlay: np.ndarray  # HxWx3 uint8 BGR: JET colour map blended over the cells' crops, boxes and p(blast)


def explain_frame(frame: np.ndarray, result: Result, detector: Detector, classifier: nn.Module) -> FrameExplanation:
    """Grad-CAM of the blast head (each cell's predicted class) for the cells `detector` found in `frame`.

    frame: the image given to detector.run (in its channel order); result: what it returned;
    classifier: the bundle's classifier from its training checkpoint (torch_backend.verified_model).
    """
    frame = validate_frame(frame, min_side=detector.limits["min_frame_side"], max_side=detector.limits["max_frame_side"], channel_order=detector.channel_order)
    if frame.shape[:2] != tuple(result.frame_shape):
        raise InvalidFrameError(f"explain_frame needs the frame the result came from: result is {result.frame_shape[1]}x{result.frame_shape[0]}, frame is {frame.shape[1]}x{frame.shape[0]}")
    heatmap = np.zeros(frame.shape[:2], np.float32)
    covered = np.zeros(frame.shape[:2], bool)
    crops = cell_crops(frame, result, detector)
    for start in range(0, len(crops), MAX_CELL_BATCH):
        cells = result.cells[start : start + MAX_CELL_BATCH]
        for cell, cell_heatmap in zip(cells, grad_cam(classifier, crops[start : start + MAX_CELL_BATCH], EXPLAINED_HEAD)):
            _paste_max(heatmap, covered, cell_heatmap, square_crop_box(cell.classifier_box, detector.classifier_spec["crop_margin"]))
    frame_bgr = frame if detector.channel_order == "BGR" else np.ascontiguousarray(frame[..., ::-1])
    return FrameExplanation(heatmap, _draw_heatmap(frame_bgr, heatmap, covered, result))


def cell_crops(frame: np.ndarray, result: Result, detector: Detector) -> np.ndarray:
    """The classifier input of every cell in `result`, exactly as Detector.classify made it: the same
    boxes, margin, channel order and the frame's own stain statistics (from prepare_frame)."""
    spec = detector.classifier_spec
    prepared = prepare_frame(frame, detector.spec, detector.segmenter_spec["input_size"], detector.channel_order)
    boxes = [cell.classifier_box for cell in result.cells]
    return prepare_crops(frame, boxes, detector.spec, spec["input_size"], spec["crop_margin"], prepared.lab_statistics, detector.channel_order, prepared.halved)


def _paste_max(heatmap: np.ndarray, covered: np.ndarray, cell_heatmap: np.ndarray, crop_box: Box) -> None:
    """Resize a crop's heatmap back onto its square crop box and keep the max, clipped to the frame."""
    x0, y0, x1, y1 = crop_box
    resized = cv2.resize(cell_heatmap, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    height, width = heatmap.shape
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    region = heatmap[fy0:fy1, fx0:fx1]
    np.maximum(region, resized[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0], out=region)
    covered[fy0:fy1, fx0:fx1] = True


def _draw_heatmap(frame_bgr: np.ndarray, heatmap: np.ndarray, covered: np.ndarray, result: Result) -> np.ndarray:
    """JET colour map over the explained crops (the rest of the frame left as it is), cell boxes, p(blast)."""
    colours = cv2.applyColorMap(np.round(heatmap * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = frame_bgr.copy()
    blended = HEATMAP_ALPHA * colours[covered].astype(np.float32) + (1.0 - HEATMAP_ALPHA) * frame_bgr[covered]
    overlay[covered] = np.round(blended).astype(np.uint8)
    draw_cell_boxes(overlay, result.cells, [f"{cell.id} p(blast)={cell.blast_probability:.2f}" for cell in result.cells])
    return overlay
