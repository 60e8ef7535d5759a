"""The per-cell path (crops, refiner, mask mapping, classifier) gives the same cells as before it was
batched and vectorized (issue 24): boxes and labels exactly, verdicts exactly, masks and probabilities
within the tolerances below.

The golden file was written by the implementation before that change (`python
tests/runtime/test_cell_path_golden.py` regenerates it: do so only for a deliberate change of outputs,
and say why in the commit). Frames: the shipped samples and real ../shared/data fields, Taleqani fields
tiled 2x2 and 3 rows of 4 (more cells than one model batch of 64), a BCCD field enlarged and shrunk. The bundle is
the shipped models/default in FP32: its INT8 kernels differ between CPUs, FP32 hardly does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.result import rle_decode

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden") / "cell_path.json"
BUNDLE = REPO_ROOT / "models" / "default"
SUBTYPES = ("Benign", "Early", "Pre", "Pro")

# A mask may differ from the golden one only where float rounding moves an argmax (a pixel or two on an
# outline); measured 0 px with the vectorized path on this machine.
MIN_MASK_IOU = 0.98
# Probabilities: the same models on the same crops up to float summation order.
PROBABILITY_TOLERANCE = 2e-3
# The verdict's domain scores (colour distance, uncertainty, cell side in px): means over model outputs, whose last
# bits differ between CPUs.
DOMAIN_SCORE_TOLERANCE = 1e-4


def _tile(images: list[np.ndarray], columns: int) -> np.ndarray:
    rows = [np.hstack(images[start : start + columns]) for start in range(0, len(images), columns)]
    return np.vstack(rows)


def golden_frames(data_root: Path | None) -> dict[str, np.ndarray]:
    """Name -> BGR frame: the shipped samples, and where the data folder exists, real fields from it."""
    frames = {f"samples/{path.name}": cv2.imread(str(path)) for path in sorted((REPO_ROOT / "samples").glob("*.jpg"))}
    if data_root is None:
        return frames
    for path in sorted((data_root / "bccd" / "images").glob("*.jpg"))[:3]:
        frames[f"bccd/{path.name}"] = cv2.imread(str(path))
    first_bccd = frames[next(name for name in frames if name.startswith("bccd/"))]
    frames["bccd enlarged 1280x960"] = cv2.resize(first_bccd, (1280, 960), interpolation=cv2.INTER_LINEAR)
    frames["bccd shrunk 320x240"] = cv2.resize(first_bccd, (320, 240), interpolation=cv2.INTER_AREA)
    taleqani = data_root / "all-taleqani" / "images"
    fields = [cv2.imread(str(sorted((taleqani / subtype).glob("*.jpg"))[0])) for subtype in SUBTYPES]
    for subtype, field in zip(SUBTYPES, fields):
        frames[f"taleqani/{subtype} first"] = field
    frames["taleqani 2x2"] = _tile(fields, 2)
    # 3 rows of 4: the segmenter's 4:3 input, so each field is as large in it as in a 3x3 tile; Early B-ALL fields,
    # crowded enough to give more cells than one model batch
    twelve = [cv2.imread(str(path)) for path in sorted((taleqani / "Early").glob("*.jpg"))[:12]]
    frames["taleqani 3x4"] = _tile(twelve, 4)
    return frames


def outputs(detector: Detector, frame: np.ndarray) -> dict:
    record = detector.run(frame).to_dict(include_masks=True)
    del record["timings"]
    return record


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _in_frame(rle: dict, box: list[int], shape: tuple[int, int]) -> np.ndarray:
    frame = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    frame[y0:y1, x0:x1] = rle_decode(rle)
    return frame


def _assert_close_probabilities(got: dict, want: dict, where: str) -> None:
    for head, classes in want.items():
        for name, probability in classes.items():
            assert abs(got[head][name] - probability) <= PROBABILITY_TOLERANCE, f"{where}: {head}/{name} {got[head][name]} != {probability}"


def assert_same_outputs(got: dict, want: dict, name: str) -> None:
    verdict, golden_verdict = dict(got["verdict"]), dict(want["verdict"])
    _assert_close_probabilities({"subtype": verdict.pop("subtype_scores")}, {"subtype": golden_verdict.pop("subtype_scores")}, name)
    domain, golden_domain = verdict.pop("domain", None) or {}, golden_verdict.pop("domain", None) or {}
    assert domain.keys() == golden_domain.keys(), name
    for score, value in golden_domain.items():
        assert abs(domain[score] - value) <= DOMAIN_SCORE_TOLERANCE, f"{name}: domain {score} {domain[score]} != {value}"
    assert verdict == golden_verdict, name  # counts, fraction, flag, status, subtype: exactly
    assert len(got["cells"]) == len(want["cells"]), name
    shape = tuple(want["frame_shape"])
    for cell, golden in zip(got["cells"], want["cells"]):
        where = f"{name} cell {golden['id']}"
        assert cell["classifier_box"] == golden["classifier_box"], where
        assert cell["label"] == golden["label"], where
        assert abs(cell["blast_probability"] - golden["blast_probability"]) <= PROBABILITY_TOLERANCE, where
        _assert_close_probabilities(cell["head_scores"], golden["head_scores"], where)
        for mask in ("mask", "nucleus_mask"):
            iou = _iou(_in_frame(cell[mask], cell["box"], shape), _in_frame(golden[mask], golden["box"], shape))
            assert iou >= MIN_MASK_IOU, f"{where}: {mask} IoU {iou:.4f} with the golden one"
    for label in ("cytoplasm", "nucleus"):
        iou = _iou(rle_decode(got["label_map"][label]), rle_decode(want["label_map"][label]))
        assert iou >= MIN_MASK_IOU, f"{name}: frame {label} IoU {iou:.4f}"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def fp32_detector() -> Detector:
    return Detector.load(BUNDLE, precision="fp32")


def test_the_shipped_samples_give_the_golden_cells(golden, fp32_detector):
    for name, frame in golden_frames(None).items():
        assert_same_outputs(outputs(fp32_detector, frame), golden[name], name)


def test_real_fields_give_the_golden_cells(golden, fp32_detector, data_root):
    frames = golden_frames(data_root)
    assert len(golden["taleqani 3x4"]["cells"]) > 64  # one frame with more cells than one model batch
    for name, frame in frames.items():
        if not name.startswith("samples/"):
            assert_same_outputs(outputs(fp32_detector, frame), golden[name], name)


if __name__ == "__main__":  # regenerate: python tests/runtime/test_cell_path_golden.py ../shared/data
    detector = Detector.load(BUNDLE, precision="fp32")
    records = {name: outputs(detector, frame) for name, frame in golden_frames(Path(sys.argv[1])).items()}
    GOLDEN.write_text(json.dumps(records, separators=(",", ":")) + "\n")
    print(f"{GOLDEN}: {len(records)} frames, {sum(len(r['cells']) for r in records.values())} cells")
