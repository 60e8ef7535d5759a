"""The domain check: is this frame like the frames the bundle was validated on?

Three signals the runtime already computes, so the check costs almost nothing:
- colour: the frame's L*a*b* mean and spread (before stain normalization, PreparedFrame.lab_statistics),
  compared with reference frames of every validated source (distance to the nearest, each feature
  divided by its spread over the references). A new stain, a blue filter or swapped channels land far
  from all of them.
- uncertainty: the segmenter's mean (1 - max class probability) over the frame's content. A model that
  cannot tell cell from background is guessing.
- cell size: the median side of the frame's white cells in frame pixels. Under a lower-power objective or a
  coarser camera the cells carry less detail than any the classifier learnt from, and it answers anyway: at half
  the magnification of Taleqani's fields it flagged 3 of 60 benign fields (docs/training.md, "Bundle 0.6.0").
  Bundles fitted before this check have no "min_cell_side_px" and skip it.
A frame beyond any threshold is "outside_domain": not judged, never flagged. The references and the
thresholds live in the manifest's "domain" section; `leukoedge train` fits them on validation frames and
`leukoedge adapt` refits them on a new microscope's frames (fit_domain). Numpy only: the runtime can adapt.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .preprocess.cpu import Box, PreparedFrame

COLOUR_FEATURES = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")
MIN_FEATURE_SPREAD = 1.0  # L*a*b* units: a feature that never varied must not make every change look huge
MAX_REFERENCES = 400  # reference frames kept in the manifest (6 numbers each)
THRESHOLD_QUANTILE = 0.99  # of the fitting frames' own scores
THRESHOLD_MARGIN = 1.25  # headroom over that quantile: the fitting frames are a sample, not every frame


def colour_features(prepared: PreparedFrame) -> np.ndarray:
    """The frame's L*a*b* mean and std (6 numbers); zeros where the bundle has no stain step."""
    if prepared.lab_statistics is None:
        return np.zeros(len(COLOUR_FEATURES))
    mean, std = prepared.lab_statistics
    return np.concatenate([np.asarray(mean, np.float64), np.asarray(std, np.float64)])


def segmenter_uncertainty(prepared: PreparedFrame, probabilities: np.ndarray) -> float:
    """Mean (1 - max class probability) over the frame's content (the letterbox padding left out)."""
    box = prepared.letterbox
    content = probabilities[:, box.pad_y : box.pad_y + box.content_height, box.pad_x : box.pad_x + box.content_width]
    return float(1.0 - content.max(axis=0).mean())


def colour_distance(spec: dict[str, Any], features: np.ndarray) -> float:
    """Distance to the nearest reference frame, in units of each feature's spread over the references."""
    references = np.asarray(spec["colour_references"], np.float64)
    spread = np.asarray(spec["colour_spread"], np.float64)
    return float(np.sqrt((((references - features) / spread) ** 2).mean(axis=1)).min())


def median_cell_side(boxes: Sequence[Box]) -> float | None:
    """The median side (square root of the box's area, frame pixels) of the frame's white cells; None without any."""
    if not boxes:
        return None
    return float(np.median([np.sqrt((x1 - x0) * (y1 - y0)) for x0, y0, x1, y1 in boxes]))


def domain_scores(spec: dict[str, Any], prepared: PreparedFrame, probabilities: np.ndarray, cell_boxes: Sequence[Box] = ()) -> dict[str, float]:
    """The frame's domain-check scores: colour distance, segmenter uncertainty and, where it has white cells
    (cell_boxes: the cells the gate kept), their median side."""
    scores = {
        "colour_distance": colour_distance(spec, colour_features(prepared)),
        "uncertainty": segmenter_uncertainty(prepared, probabilities),
    }
    side = median_cell_side(cell_boxes)
    if side is not None:
        scores["cell_side_px"] = side
    return scores


DOMAIN_CHECKS = ("colour", "uncertainty", "cell_size")


def failed_checks(spec: dict[str, Any], scores: dict[str, float]) -> list[str]:
    """Which of DOMAIN_CHECKS the frame's scores fail; [] inside the domain."""
    failed = []
    if scores["colour_distance"] > spec["max_colour_distance"]:
        failed.append("colour")
    if scores["uncertainty"] > spec["max_uncertainty"]:
        failed.append("uncertainty")
    if "min_cell_side_px" in spec and "cell_side_px" in scores and scores["cell_side_px"] < spec["min_cell_side_px"]:
        failed.append("cell_size")
    return failed


def outside_domain(spec: dict[str, Any], scores: dict[str, float]) -> str:
    """Why the frame is outside the validated domain, for a person; "" when it is inside."""
    failed = failed_checks(spec, scores)
    reasons = []
    if "colour" in failed:
        reasons.append(
            f"colours unlike every validated source (distance {scores['colour_distance']:.2f} > {spec['max_colour_distance']:.2f}): "
            "a new stain, camera or white balance; adapt the bundle to this microscope with `leukoedge adapt`"
        )
    if "uncertainty" in failed:
        reasons.append(f"the segmenter is unsure of this field (uncertainty {scores['uncertainty']:.3f} > {spec['max_uncertainty']:.3f})")
    if "cell_size" in failed:
        reasons.append(
            f"white cells smaller than any it was validated on (median {scores['cell_side_px']:.1f} px across < {spec['min_cell_side_px']:.1f}): "
            "a lower magnification or a coarser camera; use a higher-power objective or a camera with more pixels"
        )
    return "; ".join(reasons)


def fit_domain(
    colour: Sequence[np.ndarray], uncertainty: Sequence[float], sources: Sequence[str], seed: int = 0, cell_sides: Sequence[float] | None = None
) -> dict[str, Any]:
    """The manifest's "domain" section from fitting frames' colour features, uncertainties and (optional) median
    white-cell sides (NaN for a frame without white cells).

    References: up to MAX_REFERENCES frames, spread evenly over the sources. Thresholds: the
    THRESHOLD_QUANTILE of the fitting frames' own scores (colour: leave-one-out, each frame's distance
    to the nearest other reference) times THRESHOLD_MARGIN; the smallest cell side: the smallest of theirs divided by
    THRESHOLD_MARGIN (cells smaller than any validated frame's, with the same headroom).
    """
    colour = np.asarray(colour, np.float64)
    uncertainty = np.asarray(uncertainty, np.float64)
    if len(colour) < 2 or len(colour) != len(uncertainty):
        raise ValueError(f"fit_domain needs at least 2 frames with one colour vector and one uncertainty each, got {len(colour)} and {len(uncertainty)}")
    rng = np.random.default_rng(seed)
    names = sorted(set(sources))
    per_source = max(1, MAX_REFERENCES // len(names))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(np.asarray(sources) == name))[:per_source] for name in names])
    references = colour[np.sort(chosen)]
    spread = np.maximum(references.std(axis=0), MIN_FEATURE_SPREAD)
    distances = np.sqrt((((colour[:, None, :] - references[None, :, :]) / spread) ** 2).mean(axis=2))
    is_itself = np.all(colour[:, None, :] == references[None, :, :], axis=2)
    distances[is_itself] = np.inf  # leave-one-out: a reference is not its own nearest neighbour
    nearest = distances.min(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    spec = {
        "colour_features": list(COLOUR_FEATURES),
        "colour_references": np.round(references, 3).tolist(),
        "colour_spread": np.round(spread, 4).tolist(),
        "max_colour_distance": float(np.quantile(nearest, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN),
        "max_uncertainty": float(np.quantile(uncertainty, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN),
        "fitted_on": {"frames": int(len(colour)), "sources": {name: int(np.sum(np.asarray(sources) == name)) for name in names}},
    }
    sides = np.asarray([] if cell_sides is None else cell_sides, np.float64)
    sides = sides[np.isfinite(sides)]
    if sides.size:
        spec["min_cell_side_px"] = float(sides.min() / THRESHOLD_MARGIN)
    return spec
