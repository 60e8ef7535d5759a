"""The domain check: is this frame like the frames the bundle was validated on?

Signals the runtime already computes, or reads from pixels it already holds, so the check costs 1-3 ms a frame
(docs/performance.md, "The focus check's cost"):
- colour: how the frame's L*a*b* channels vary together as the segmenter sees it (after stain normalization),
  compared with reference frames of every validated source (distance to the nearest, each feature divided by
  its spread over the references). The stain normalization gives every frame the reference's channel means
  and spreads, so those say little about what the models will see; it cannot change the channels'
  correlations: a stain whose hues are turned (another dye, another protocol) or swapped channels move them,
  and those are the changes that made the models flag normal fields (docs/training.md, "Bundle 0.7.0").
  Bundles fitted before 0.7.0 compare the frame's L*a*b* means and spreads before normalization
  (MEAN_SPREAD_FEATURES); the manifest names the features it was fitted on.
- uncertainty: the segmenter's mean (1 - max class probability) over the frame's content. A model that
  cannot tell cell from background is guessing.
- cell size: the median side of the frame's white cells in frame pixels. Under a lower-power objective or a
  coarser camera the cells carry less detail than any the classifier learnt from, and it answers anyway: at half
  the magnification of Taleqani's fields it flagged 3 of 60 benign fields (docs/training.md, "Bundle 0.6.0"). The bar is
  half the smallest-celled source's typical side (MIN_CELL_SIDE_SHARE). Bundles fitted before this check have no
  "min_cell_side_px" and skip it.
- focus: how wide the white cells' edges are, in units of each cell's own size (edge_width, from the frame's
  pixels inside the cells' boxes). Out of focus, the classifier still answers: blurred benign Taleqani fields were
  flagged as leukemic and PBC's white-cell types went wrong with no frame refused (docs/training.md, "Bundle
  0.11.0: out of focus"). Bundles fitted before this check have no "max_edge_width" and skip it (and do not measure it).
- motion: how evenly the frame's steepest edges run every way (edge_isotropy). The stage or camera moving during the
  exposure softens edges along the motion only, which the focus check, reading the steepest edges whichever way they
  run, sees only partly: motion blur of a fifth of a cell turned PBC's white-cell types from 54 of 57 right to 37 of
  56 with no frame refused (docs/training.md, "Motion blur (the motion check)"). Not fitted (MIN_EDGE_ISOTROPY; every
  bundle with a domain check).
- noise: the camera's noise as the classifier sees the white cells (noise_level: grey levels once each cell is
  shrunk to its 64-px crop). Under sensor noise the classifier calls fewer blasts on every field and says nothing:
  Taleqani's malignant validation fields flagged 60 of 60 as captured, 53 with noise of 8 grey levels, 20 with 16
  (docs/training.md, "Bundle 0.12.0: sensor noise"). Bundles fitted before this check have no "max_noise" and skip it.
- colour at all: a stained smear has colour. A greyscale image, a monochrome camera or an empty field has almost
  none, and the stain normalization would blow its noise up into colours (MIN_CHROMA_SPREAD; every bundle).
- compression: the JPEG quality of a frame read from a JPEG file (decode.jpeg_quality; camera frames have none),
  against the lowest quality any validated source was saved at (75). Compressed harder, blasts are lost and a normal
  field can be flagged (Taleqani's malignant validation fields saved again at quality 50: 45 of 60 flagged; at 70 one
  normal TXL-PBC raabin field flagged; docs/training.md, "Bundle 0.13.0: compressed files"). Bundles fitted before
  this check have no "min_jpeg_quality" and skip it. And, for every bundle with a domain check, the quality the frame's
  pixels were last compressed at (decode.pixel_jpeg_quality, as captured: an MJPEG camera, a JPEG saved again at a
  higher quality or as PNG), against MIN_PIXEL_JPEG_QUALITY (not fitted: below), or against the file bar where its
  white cells are small enough to be enlarged for the classifier (pixel_jpeg_bar).
- field of view: how much of the frame lies outside the microscope's field of view (outside_field) and how much is
  black inside it (dark_share). A camera on an eyepiece or a phone adapter sees a circular field with black corners;
  the stain normalization read them as smear and shifted every colour, and normal fields were flagged (Zheng's
  validation fields cut to a circle of 0.8 of the half-diagonal: 7 of 35 judged; `scripts/capture_study.py --fault
  vignette`). The runtime now fills the black outside the field (preprocess.cpu.fill_outside_field) and judges such a
  frame; beyond MAX_OUTSIDE_FIELD outside it, or MAX_DARK_SHARE black inside it, the frame is refused. Not fitted;
  every bundle: no stained smear is black.
- channel order: on a frame about to be flagged only, how much nearer the validated colours it comes with red and blue
  swapped (swapped_colour_gain, SWAP_MARGIN; not fitted, every bundle).
- detail: on a frame about to be flagged whose white cells are enlarged for the classifier, how much fine detail they
  hold (cell_detail, MIN_FLAG_DETAIL; not fitted, every bundle): through a coarser camera benign fields were flagged.
- completeness: the longest band of rows of one colour, or repeating the row above (incomplete_rows): a camera buffer
  not fully written or a truncated image. Not fitted (MAX_INCOMPLETE; every bundle). And, on a frame about to be
  flagged only, a tear: rows below one row that match those above far better shifted sideways (tear_score, MAX_TEAR;
  a buffer that lost its line sync). Not fitted; every bundle.
- illumination: how far the background's light falls off across the frame as captured (illumination_falloff,
  preprocess.cpu.illumination_falloff). The runtime evens a frame whose light falls off by a quarter or more before
  any model sees it (preprocess.cpu.even_illumination); beyond MAX_FALLOFF (not fitted; every bundle) the dark side is
  too dark to bring back (scripts/capture_study.py --fault illumination; docs/training.md, "Uneven light, and other capture faults measured").
A frame beyond any threshold is "outside_domain": not judged, never flagged. The references and the
thresholds live in the manifest's "domain" section; `leukoedge train` fits them on validation frames and
`leukoedge adapt` adapts them to a new microscope's frames (adapt.adapted_domain). No torch: the runtime can adapt.
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from .decode import pixel_jpeg_quality
from .preprocess.cpu import DARK_LEVEL, MAX_DARK_SHARE, STAGED_SHRINK_REST, Box, PreparedFrame, PreprocessSpec, dark_share, prepare_frame, region_source, resize, shrink_frame, whole_block

COLOUR_FEATURES = ("L_a_correlation", "L_b_correlation", "a_b_correlation")  # what fit_domain fits now
MEAN_SPREAD_FEATURES = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")  # bundles fitted before 0.7.0
# The smallest spread a feature is divided by, so a feature that never varied does not make every change look huge:
# in L*a*b* units for means and spreads, in correlation for correlations.
MIN_FEATURE_SPREAD = {**{name: 1.0 for name in MEAN_SPREAD_FEATURES}, **{name: 0.02 for name in COLOUR_FEATURES}}
MAX_REFERENCES = 400  # reference frames kept in the manifest (one number per feature each)
THRESHOLD_QUANTILE = 0.99  # of the fitting frames' own scores
THRESHOLD_MARGIN = 1.25  # headroom over that quantile: the fitting frames are a sample, not every frame
# The noise threshold is fitted on the largest of the fitting frames' noise, not the 0.99 quantile: one source's camera
# (Taleqani's) is noisier than every other's, and that quantile of 272 validation fields cut into its own tail (it
# refused 6 of its 386 test fields as captured; docs/training.md, "Bundle 0.12.0: sensor noise").
NOISE_QUANTILE = 1.0
# The smallest white-cell side judged: this share of the typical side of the smallest-celled validated source (the
# median of its fields' median sides; sources with at least MIN_SIDE_FIELDS fields with a white cell), that is, half its
# magnification. It was the single smallest field's median over THRESHOLD_MARGIN: one field of 272, which moved the bar
# 2 px between two segmenters whose boxes differ by one (15.5 and 17.5 px) and refused malignant Taleqani fields whose
# cells were as large as validated ones (docs/training.md, "Bundle 0.15.0").
MIN_CELL_SIDE_SHARE = 0.5
MIN_SIDE_FIELDS = 10
# A frame whose a* and b* spreads (OpenCV L*a*b* of float RGB, before stain normalization) are both below this has no
# stain colour to judge: a stained field of every source spreads at least 5 (`python scripts/chroma_spread.py --data
# ../shared/data`); a greyscale image has none (the frame statistics floor a spread at 1.0). Not fitted: no bundle
# can judge such a frame, and `leukoedge adapt` must not learn it as a device's colours.
MIN_CHROMA_SPREAD = 2.0


# A frame that shows the microscope's field of view (preprocess.cpu.shows_field_of_view) has the black outside it
# filled with the field's background colour before any model sees it (preprocess.cpu.fill_outside_field). Filled, the
# validation fields cut to a circle of 0.95-0.8 of the half-diagonal (1-13 % of the frame outside it) were judged as
# captured; at 0.7 (25-30 % outside) 4 of 60 benign Taleqani fields were flagged (1 as captured): a frame more than
# MAX_OUTSIDE_FIELD outside its field of view is refused, and so is one still more than MAX_DARK_SHARE black inside it
# (docs/training.md, "A circular field of view"). Not fitted, as MIN_CHROMA_SPREAD.
MAX_OUTSIDE_FIELD = 0.15

# A camera buffer not fully written, or a truncated image, shows as rows of one colour (OpenCV's grey for a JPEG cut
# short, green for a YUV buffer of zeros) or rows that repeat the one above; such frames flagged normal validation
# fields (scripts/capture_study.py --fault truncated; docs/training.md, "Incomplete frames"). No smear row is one value
# across the frame, and no source frame of any split has a run of MIN_INCOMPLETE_RUN such rows once rows all black
# (outside the field of view) or all white (a clipped background, Zheng's) are left out (scripts/capture_levels.py).
# Read on the green channel of INCOMPLETE_SAMPLES columns spread over the width (every column of a narrower frame;
# 0.1 ms on a 640x480 frame).
INCOMPLETE_SAMPLES = 64
FLAT_RANGE = 0  # grey levels across a row: a flat row is one value (a smear's smoothest background varies by 2-3)
MAX_INCOMPLETE = 0.02  # of the frame's rows in one run (and at least MIN_INCOMPLETE_RUN)
MIN_INCOMPLETE_RUN = 8  # rows: a few repeating rows are an upscaled image's (an ALL-IDB2 thumbnail repeats 6)


def incomplete_rows(frame: np.ndarray) -> float:
    """The share of the frame's rows in its longest run of rows that are flat (FLAT_RANGE) or repeat the row above,
    leaving out rows all black (the field-of-view check's) or all white (a clipped background); 0 for a run shorter
    than MIN_INCOMPLETE_RUN."""
    sampled = np.ascontiguousarray(frame[:, :: max(1, frame.shape[1] // INCOMPLETE_SAMPLES), 1])
    high, low = sampled.max(axis=1), sampled.min(axis=1)
    repeated = np.r_[False, (sampled[1:] == sampled[:-1]).all(axis=1)]
    broken = (((high - low) <= FLAT_RANGE) | repeated) & (high >= DARK_LEVEL) & (low < 250)
    if not broken.any():
        return 0.0
    starts_ends = np.diff(np.r_[0, broken.astype(np.int8), 0])
    longest = int((np.flatnonzero(starts_ends == -1) - np.flatnonzero(starts_ends == 1)).max())
    return longest / len(broken) if longest >= MIN_INCOMPLETE_RUN else 0.0


# A torn frame: a camera buffer whose lower rows were written shifted sideways (a lost line sync). Every row of a smear
# matches the row above it best where it stands; at a tear, the row below matches the row above far better shifted.
# tear_score reads the green channel shrunk across to TEAR_WIDTH columns (every row kept: a tear lies between two
# rows) and compares, for each pair of adjacent rows, their root-mean-square difference where they stand with the
# smallest at any shift of TEAR_MIN_SHIFT columns or more either way (round the row: a shift of up to half the width
# either way, all shifts at once from the rows' Fourier transforms). +1 grey level, so that two flat rows compare as
# equal. Read on a frame about to be flagged only, as the channel-order check is (a torn frame's harm is a false flag).
TEAR_WIDTH = 64
TEAR_MIN_SHIFT = 3
# A frame scoring over MAX_TEAR is refused: every source's frames of every split score 2.18 at most (a Zheng training
# image; the validation fields 1.39: scripts/capture_levels.py), validation fields torn at 5-30 % of their width score
# 4-16 (scripts/capture_study.py --fault torn).
MAX_TEAR = 3.0
# A frame wider than every source's (BCCD's 640 px) is shrunk across by whole column blocks first: in OpenCV's general
# INTER_AREA path the check took 9.4 ms at 2592x1944 and 29.7 at 4056x3040 (3.5 at a whole 2560x1920; now 4.2 and 8.3:
# scripts/megapixel_bench.py --camera-frames), on a frame about to be flagged.
# No validated frame is that wide, so their scores (MAX_TEAR's evidence) do not move.
TEAR_STAGED_FROM = 640


# A white cell cut by the frame's edge and spanning at least MAX_CUT_CELL_SHARE of the frame's shorter side is larger
# than the frame shows whole: a higher magnification than the sources' (a camera's region of interest cut around the
# field's centre, a relay lens). Validation fields with their centre third enlarged to the whole frame
# (scripts/capture_study.py --fault zoom --levels 3) had such cells, a lobed neutrophil or a myelocyte filling the
# frame, split into pieces each called a blast: 13 normal fields flagged (BCCD, PBC, TXL-PBC bcd and raabin), none as
# captured. A flagged frame with fewer than MIN_WHOLE_BLASTS blasts left once those cells are set aside is refused;
# no validated frame's flag rests on one (Taleqani's cells span 0.14 of its fields).
MAX_CUT_CELL_SHARE = 0.4
MIN_WHOLE_BLASTS = 2


def large_cut_cells(boxes: Sequence[Box], frame_shape: tuple[int, ...]) -> list[bool]:
    """Per box (x0, y0, x1, y1, ends exclusive), whether it touches the frame's edge and spans MAX_CUT_CELL_SHARE of the
    frame's shorter side or more."""
    height, width = frame_shape[:2]
    reach = MAX_CUT_CELL_SHARE * min(height, width)
    return [
        (x0 <= 0 or y0 <= 0 or x1 >= width or y1 >= height) and max(x1 - x0, y1 - y0) >= reach
        for x0, y0, x1, y1 in boxes
    ]


def tear_score(frame: np.ndarray) -> float:
    """The largest, over the frame's adjacent rows, of how much better the lower row matches the upper one shifted
    sideways than where it stands (about 1 or less: no better; a tear: several times better)."""
    green = np.ascontiguousarray(frame[:, :, 1])
    height, width = green.shape
    if width > TEAR_STAGED_FROM and width % TEAR_WIDTH:  # whole column blocks first, as preprocess.cpu.shrink_frame does
        if (block := whole_block(width, TEAR_WIDTH)) > 1:
            green = cv2.resize(green, (width // block, height), interpolation=cv2.INTER_AREA)
    rows = cv2.resize(green, (TEAR_WIDTH, height), interpolation=cv2.INTER_AREA).astype(np.float64)
    if len(rows) < 2:
        return 0.0
    upper, lower = rows[:-1], rows[1:]
    # The rows' circular cross-correlation at every shift; squared difference = |upper|^2 + |lower|^2 - 2 correlation.
    correlation = np.fft.irfft(np.fft.rfft(upper, axis=1) * np.conj(np.fft.rfft(lower, axis=1)), n=TEAR_WIDTH, axis=1)
    squared = (upper * upper).sum(axis=1, keepdims=True) + (lower * lower).sum(axis=1, keepdims=True) - 2.0 * correlation
    difference = np.sqrt(np.maximum(squared, 0.0) / TEAR_WIDTH)  # per shift 0 .. TEAR_WIDTH - 1 (round the row)
    shifted = difference[:, TEAR_MIN_SHIFT : TEAR_WIDTH - TEAR_MIN_SHIFT + 1].min(axis=1)
    return float((difference[:, 0] / (shifted + 1.0)).max())


# channel_correlations reads every third row and column of the segmenter's input: the same correlations to ~0.005 as
# every pixel's on the shipped samples, in 0.5 ms instead of 3.3 on a 2-core x86 CPU (timed by hand).
CORRELATION_STEP = 3


def channel_correlations(prepared: PreparedFrame, preprocess: PreprocessSpec) -> np.ndarray:
    """The L*-a*, L*-b* and a*-b* correlations of the segmenter's input (its content, CORRELATION_STEP apart), which
    is the frame after stain normalization; 0 for a channel that does not vary."""
    box = prepared.letterbox
    step = CORRELATION_STEP
    content = prepared.tensor[0, :, box.pad_y : box.pad_y + box.content_height : step, box.pad_x : box.pad_x + box.content_width : step]
    rgb = content * np.asarray(preprocess.std, np.float32)[:, None, None] + np.asarray(preprocess.mean, np.float32)[:, None, None]
    if preprocess.channel_order == "BGR":
        rgb = rgb[::-1]
    lab = cv2.cvtColor(np.ascontiguousarray(np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0)), cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64)
    centred = lab - lab.mean(axis=0)
    covariance = centred.T @ centred
    scale = np.sqrt(np.diag(covariance))
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.nan_to_num(covariance / np.outer(scale, scale), nan=0.0, posinf=0.0, neginf=0.0)
    return np.array([correlation[0, 1], correlation[0, 2], correlation[1, 2]])


# Red and blue swapped (an integrator passing RGB where BGR is expected) is refused for its colours on most frames, but
# not on every stain: 3 of the 8 TXL-PBC bcd normal validation fields still judged so were flagged (scripts/
# capture_study.py --fault channels). A flagged frame is checked once more: if its colours come nearer the validated
# sources' with red and blue swapped back, by more than SWAP_MARGIN, it is refused. No source frame inside the colour
# domain, in any split, comes nearer by more than 0.18 (Zheng's and raabin's stains are almost as red as blue;
# scripts/capture_levels.py), and most swapped frames inside it come nearer by more (docs/training.md, "Red and blue
# swapped"). The swap goes through the segmenter's own preprocessing, as the references did (4.5 ms on a 640x480 frame, 2.8 on a 224x224 one, spent on flagged frames only).
SWAP_MARGIN = 0.25


def swapped_colour_gain(
    spec: dict[str, Any], frame: np.ndarray, distance: float, preprocess: PreprocessSpec, input_size: Sequence[int], channel_order: str = "BGR"
) -> float:
    """How much nearer the validated colours the frame comes with its red and blue swapped: its colour_distance
    (`distance`, the check's own) minus its swap's, prepared for the segmenter's input_size as the frame was; > 0 where
    the swap looks more like them."""
    swapped = prepare_frame(np.ascontiguousarray(frame[..., ::-1]), preprocess, input_size, channel_order)
    return float(distance - colour_distance(spec, colour_features(swapped, preprocess, feature_names(spec))))


def feature_names(spec: dict[str, Any]) -> tuple[str, ...]:
    """The colour features a domain section was fitted on (bundles that do not name them: means and spreads)."""
    return tuple(spec.get("colour_features", MEAN_SPREAD_FEATURES))


def colour_features(prepared: PreparedFrame, preprocess: PreprocessSpec, names: Sequence[str] = COLOUR_FEATURES) -> np.ndarray:
    """The frame's colour features named (COLOUR_FEATURES, or a bundle's own: its domain spec's "colour_features").
    MEAN_SPREAD_FEATURES are zeros where the bundle has no stain step."""
    if tuple(names) == COLOUR_FEATURES:
        return channel_correlations(prepared, preprocess)
    if tuple(names) != MEAN_SPREAD_FEATURES:
        raise ValueError(f"unknown colour features {list(names)}; expected {list(COLOUR_FEATURES)} or {list(MEAN_SPREAD_FEATURES)}")
    if prepared.lab_statistics is None:
        return np.zeros(len(MEAN_SPREAD_FEATURES))
    mean, std = prepared.lab_statistics
    return np.concatenate([np.asarray(mean, np.float64), np.asarray(std, np.float64)])


def chroma_spread(prepared: PreparedFrame) -> float | None:
    """The larger of the frame's a* and b* spreads before stain normalization; None where the bundle has no stain step."""
    if prepared.lab_statistics is None:
        return None
    return float(np.max(prepared.lab_statistics[1][1:]))


def segmenter_uncertainty(prepared: PreparedFrame, probabilities: np.ndarray) -> float:
    """Mean (1 - max class probability) over the frame's content (the letterbox padding left out)."""
    box = prepared.letterbox
    content = probabilities[:, box.pad_y : box.pad_y + box.content_height, box.pad_x : box.pad_x + box.content_width]
    return float(1.0 - content.max(axis=0).mean())


# A frame in which no white cell is kept while the segmenter marks white-cell pixels over more than this share of it
# shows a white cell larger than the frame shows whole (a higher magnification: one cell filling the frame, touching
# every edge, was reported "no white cell" in magnified validation fields, scripts/capture_study.py --fault zoom), not
# an empty field. The validated frames without a white cell (413 of the train and validation splits, PBC's platelet
# and erythroblast images among them) reach 0.27 at most; over THRESHOLD_MARGIN, 0.34.
MAX_EMPTY_FOREGROUND = 0.34


def foreground_share(prepared: PreparedFrame, probabilities: np.ndarray) -> float:
    """The share of the frame's content (the letterbox padding left out) the segmenter marks as white cell (cytoplasm or
    nucleus over background)."""
    box = prepared.letterbox
    content = probabilities[:, box.pad_y : box.pad_y + box.content_height, box.pad_x : box.pad_x + box.content_width]
    return float((content[0] < content[1:].max(axis=0)).mean())


def colour_distance(spec: dict[str, Any], features: np.ndarray) -> float:
    """Distance to the nearest reference frame, in units of each feature's spread over the references."""
    references = np.asarray(spec["colour_references"], np.float64)
    spread = np.asarray(spec["colour_spread"], np.float64)
    return float(np.sqrt((((references - features) / spread) ** 2).mean(axis=1)).min())


def box_sides(boxes: Sequence[Box]) -> np.ndarray:
    """Each box's side in frame pixels: the square root of its area (the size both this check and the refiner's
    refiner.min_cell_side_px read)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def median_cell_side(boxes: Sequence[Box]) -> float | None:
    """The median side (box_sides) of the frame's white cells; None without any."""
    if not len(boxes):
        return None
    return float(np.median(box_sides(boxes)))


# The focus check's scale: each white cell's box is resampled to FOCUS_SIZE px a side, so an edge's width is measured in
# units of the cell's own size whatever the magnification and camera; its steepest FOCUS_EDGE_SHARE of pixels are its
# edges (nucleus, membrane), and CONTRAST_WINDOW px around each is the contrast across it.
FOCUS_SIZE = 64
FOCUS_EDGE_SHARE = 0.03
CONTRAST_WINDOW = 9
_CONTRAST_KERNEL = np.ones((CONTRAST_WINDOW, CONTRAST_WINDOW), np.uint8)
_CHANNEL_MEAN = np.full((1, 3), 1.0 / 3.0, np.float32)
_CHANNEL_SUM = np.ones((1, 3), np.float32)


MIN_MEASURED_SIDE = 8  # px: a box smaller than this a side holds too few pixels for the focus and detail measures
# The focus and detail measures are medians over a frame's white cells; MAX_MEASURED_CELLS of them, spread evenly over
# the cells in the order found, estimate that median as well as every cell would, and a crowded (leukemic) field's check
# then costs what a normal field's does (the check's ms per extra cell 0.22 -> 0.10, leukoedge bench --data: issue 24's
# "speed that does not grow with the cells").
MAX_MEASURED_CELLS = 16


def measured_cells(boxes: Sequence[Box]) -> list[Box]:
    """At most MAX_MEASURED_CELLS of the boxes, spread evenly over them in their order (every box where fewer)."""
    if len(boxes) <= MAX_MEASURED_CELLS:
        return list(boxes)
    return [boxes[index] for index in np.linspace(0, len(boxes) - 1, MAX_MEASURED_CELLS).round().astype(int).tolist()]


def box_in_frame(box: Box, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """The box rounded to whole pixels and clipped to the frame; None where under MIN_MEASURED_SIDE px a side."""
    x0, y0, x1, y1 = (int(round(value)) for value in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, frame_shape[1]), min(y1, frame_shape[0])
    if x1 - x0 < MIN_MEASURED_SIDE or y1 - y0 < MIN_MEASURED_SIDE:
        return None
    return x0, y0, x1, y1


def cell_edge_widths(frame: np.ndarray, boxes: Sequence[Box], halved: Sequence[np.ndarray] = ()) -> list[float | None]:
    """How blurred each white cell's edges are: the sigma of the Gaussian blur that a sharp step of the cell's contrast
    would need to rise as gently as its steepest edges do, in 1/FOCUS_SIZE of its box. A focused cell measures
    about 1 (the resampling's own blur); defocus widens it. Only the frame's own pixels are read (no padding, whose
    edge is sharp whatever the focus); None for a box under MIN_MEASURED_SIDE px a side or without any edge. halved: the
    frame's halvings (PreparedFrame.halved), which a camera-sized frame's large cells are read from, as their crops."""
    tiles, measured = [], []
    for index, box in enumerate(boxes):
        if (clipped := box_in_frame(box, frame.shape)) is None:
            continue
        image, (x0, y0, x1, y1) = region_source(frame, halved, clipped, FOCUS_SIZE, FOCUS_SIZE)
        tiles.append(resize(image[y0:y1, x0:x1], FOCUS_SIZE, FOCUS_SIZE))  # area-averaged when shrinking, as the crops
        measured.append(index)
    widths: list[float | None] = [None] * len(boxes)
    if not tiles:
        return widths
    # The cells' tiles stacked into one image: the filters reach CONTRAST_WINDOW // 2 px, and that border of every
    # tile is left out, so no tile's figure reads its neighbour's pixels, and the filters run once per frame.
    # On the channels' sum (whole numbers, exact through the integer kernels), the gradients' length by numpy (each
    # step rounded alike wherever the arrays lie): cv2.magnitude's float32 rounding differed by where its arrays lay
    # in memory and moved a width in its 8th digit.
    grey = cv2.transform(np.concatenate(tiles).astype(np.float32), _CHANNEL_SUM)
    dx, dy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    # Sobel's 3x3 kernels give 8x the derivative and the sum 3x the channels' mean; the window's max - min is the
    # contrast across an edge. In place: a frame of crowded cells stacks megabytes of tiles.
    dx *= dx
    dy *= dy
    dx += dy
    gradient = np.sqrt(dx, out=dx)
    gradient /= np.float32(24.0)
    contrast = cv2.dilate(grey, _CONTRAST_KERNEL)
    contrast -= cv2.erode(grey, _CONTRAST_KERNEL)
    contrast /= np.float32(3.0)
    inner = slice(CONTRAST_WINDOW // 2, -(CONTRAST_WINDOW // 2))
    gradient = gradient.reshape(len(tiles), FOCUS_SIZE, FOCUS_SIZE)[:, inner, inner].reshape(len(tiles), -1)
    contrast = contrast.reshape(len(tiles), FOCUS_SIZE, FOCUS_SIZE)[:, inner, inner].reshape(len(tiles), -1)
    steepest = max(1, int(round(FOCUS_EDGE_SHARE * gradient.shape[1])))
    edges = np.argpartition(gradient, -steepest, axis=1)[:, -steepest:]
    slopes, heights = np.take_along_axis(gradient, edges, axis=1), np.take_along_axis(contrast, edges, axis=1)
    # A step of height h blurred by a Gaussian of sigma s rises at most h / (s * sqrt(2 pi)) per pixel.
    estimates = np.median(heights / (slopes * np.sqrt(2.0 * np.pi) + 1e-6), axis=1)
    for index, estimate, slope in zip(measured, estimates, slopes):
        widths[index] = float(estimate) if np.any(slope > 0) else None
    return widths


def edge_width(frame: np.ndarray, boxes: Sequence[Box], halved: Sequence[np.ndarray] = ()) -> float | None:
    """The median of the frame's white cells' cell_edge_widths (measured_cells of them); None without any measurable."""
    widths = [width for width in cell_edge_widths(frame, measured_cells(boxes), halved) if width is not None]
    return float(np.median(widths)) if widths else None


# A frame about to be flagged whose white cells are enlarged for the classifier (median side under
# ENLARGED_CELL_SIDE_PX) must show the fine detail validated flags rest on: the classifier's crop of such a cell holds only
# what the frame's pixels hold, and with less of it a benign lymphocyte reads as a blast. cell_detail reads the frame's
# finest structure against its next coarser one inside the cells' boxes: Taleqani's 312 flagged malignant validation
# fields measure 1.76 at least (0.01 quantile 2.11); the same fields through a camera with half the detail (shrunk to half
# and enlarged back, scripts/coarser_camera.py) measure 1.55 (median), and 5 of its 60 benign test fields were flagged so,
# which no other check refuses. MIN_FLAG_DETAIL was that quantile over THRESHOLD_MARGIN (1.7); it is now chosen on the
# validation fields as the lowest bar that refuses every benign flag through a camera with half the detail (those
# measure 1.42-1.85; at 0.7 of the detail two stay above it, 1.92 and 2.31) at the cost of at most one validated flag
# as captured (1 of 312 under 1.9): a false flag is this
# product's worst outcome, a refused soft frame the safe one (python scripts/coarser_camera.py models/default --data
# ../shared/data --benign-flags --split val --without-detail-check). Not fitted (every bundle), as the flag's other
# checks: it is the frame's detail, not a model's (docs/training.md, "A coarser camera (the detail check)").
MIN_FLAG_DETAIL = 1.9
DETAIL_PAD = 6  # px read around a box: the coarser blur's reach (3 sigma of 2 px), so a box's edge is measured as its inside


def cell_detail(frame: np.ndarray, boxes: Sequence[Box]) -> float | None:
    """How much fine detail the frame's white cells hold: per box, the mean |Laplacian| (the finest, 1-px structure) over
    the mean |difference of Gaussians at 1 and 2 px| (the next coarser), both of the channels' mean inside the box; the
    median over boxes (measured_cells of them) of at least MIN_MEASURED_SIDE px a side, None without one. About 3.5 on
    Taleqani's fields as captured; a frame with half the detail (a coarser sensor, soft focus, heavy compression) about
    1.5."""
    height, width = frame.shape[:2]
    ratios = []
    for box in measured_cells(boxes):
        if (clipped := box_in_frame(box, frame.shape)) is None:
            continue
        x0, y0, x1, y1 = clipped
        wx0, wy0 = max(x0 - DETAIL_PAD, 0), max(y0 - DETAIL_PAD, 0)
        window = frame[wy0 : min(y1 + DETAIL_PAD, height), wx0 : min(x1 + DETAIL_PAD, width)]
        grey = cv2.transform(window.astype(np.float32), _CHANNEL_MEAN)
        inside = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
        finest = float(np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1))[inside].mean())
        coarser = float(np.abs(cv2.GaussianBlur(grey, (0, 0), 1.0) - cv2.GaussianBlur(grey, (0, 0), 2.0))[inside].mean())
        if coarser > 0:
            ratios.append(finest / coarser)
    return float(np.median(ratios)) if ratios else None


# The noise check reads NOISE_GRID x NOISE_GRID patches of NOISE_PATCH px spread evenly over the frame (the whole frame
# when it is smaller): the camera's noise is the same everywhere, and 16 patches are 65k pixels whatever the frame's
# size (under 1 ms on a 2-core x86 CPU; a 5-MP frame has 80 times as many). NOISE_FLAT_SHARE: the flattest of their
# pixels, the smear's background and the smooth insides of red cells, where nothing but noise moves the second
# differences.
NOISE_PATCH = 64
NOISE_GRID = 4
NOISE_FLAT_SHARE = 0.5
# Immerkaer's (1996) kernel: the difference of two discrete Laplacians, zero on any plane and nearly zero on smooth
# image structure; on white noise of sigma s its response has the standard deviation 6 s.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def frame_noise(frame: np.ndarray) -> float:
    """The standard deviation of the frame's noise, in grey levels of the channels' mean (Immerkaer's estimate, sigma =
    sqrt(pi / 2) * mean |response| / 6, over the flattest NOISE_FLAT_SHARE of the patches' pixels).

    The same frame gives the same figure to the last digit in every process and buffer: the filters run on the channels'
    sum (whole numbers, which float32 holds exactly through the integer kernels, whichever code path OpenCV takes; on the
    float mean, one BCCD frame gave two figures 2e-5 apart, by its buffer, once ONNX Runtime had run in the process), the
    slopes are compared squared in whole numbers, the flattest pixels are chosen in index order among equal slopes, and
    their mean is taken in float64."""
    height, width = frame.shape[:2]
    size = min(NOISE_PATCH, height, width)
    if height <= NOISE_GRID * NOISE_PATCH and width <= NOISE_GRID * NOISE_PATCH:
        patches = [frame]
    else:
        ys = np.linspace(0, height - size, NOISE_GRID).astype(int)
        xs = np.linspace(0, width - size, NOISE_GRID).astype(int)
        patches = [frame[y : y + size, x : x + size] for y in ys for x in xs]
    # The patches stacked into one image, so the filters run once; each patch's 1-px border, where the 3x3 filters
    # read its neighbour's pixels, is left out.
    grey = cv2.transform(np.concatenate(patches).astype(np.float32), _CHANNEL_SUM)
    response = np.abs(cv2.filter2D(grey, cv2.CV_32F, _NOISE_KERNEL))
    # The squared slope in whole numbers: float32's magnitude rounds differently by the buffer's alignment (OpenCV's
    # vector and scalar paths), which changed which pixels count as the flattest.
    gx, gy = (cv2.Sobel(grey, cv2.CV_32F, 1, 0).astype(np.int32), cv2.Sobel(grey, cv2.CV_32F, 0, 1).astype(np.int32))
    slope = gx * gx + gy * gy
    rows = patches[0].shape[0]
    inner = np.ones(grey.shape[0], bool)
    inner[0::rows], inner[rows - 1 :: rows] = False, False
    response, slope = response[inner, 1:-1].ravel(), slope[inner, 1:-1].ravel()
    if response.size == 0:
        return 0.0
    flattest = max(1, int(NOISE_FLAT_SHARE * slope.size))
    bound = np.partition(slope, flattest - 1)[flattest - 1]
    below = slope < bound
    at_bound = np.flatnonzero(slope == bound)[: flattest - int(np.count_nonzero(below))]  # ties: the first in index order
    total = response[below].sum(dtype=np.float64) + response[at_bound].sum(dtype=np.float64)
    return float(np.sqrt(np.pi / 2.0) * total / flattest / 6.0 / 3.0)  # / 3: the sum's levels to the mean's


# The motion check reads how evenly the frame's edges run every way. Red and white cells' outlines are round, so the
# steepest gradients of a sharp smear point every way; the stage or camera moving while the shutter is open softens the
# edges along the motion only, and the steepest gradients left point across it. ISOTROPY_EDGE_SHARE: the steepest of
# the frame's pixels read. Frames are area-shrunk to ISOTROPY_SIDE px first (a motion long enough to matter, a tenth of
# a cell, still spans pixels there; 0.7 ms on a 640x480 frame). Dark pixels and their
# neighbours are left out: black bars and a field of view's rim are straight or circular edges the smear does not hold.
ISOTROPY_EDGE_SHARE = 0.05
ISOTROPY_SIDE = 320
_DARK_NEIGHBOURHOOD = np.ones((5, 5), np.uint8)
# A frame whose edge isotropy is under this is refused. The lowest of every source's validation fields is 0.180 (a
# Taleqani field; scripts/capture_levels.py), divided by THRESHOLD_MARGIN: 0.144, rounded up. Not fitted: a device's own frames can
# be softer one way as captured (TXL-PBC bcd's median 0.32), and a bar fitted as the others are moves with them (about 0.17
# with bcd's validation fields, 0.34 without, which would refuse most of bcd's frames in a bundle that never saw them).
MIN_EDGE_ISOTROPY = 0.145


def pixel_jpeg_bar(spec: dict[str, Any], scores: dict[str, float]) -> int:
    """The JPEG quality under which a frame's pixels are refused: MIN_PIXEL_JPEG_QUALITY, or, where its median white
    cell is under ENLARGED_CELL_SIDE_PX (the classifier enlarges it, and its compression blocks with it), the bundle's
    file bar (min_jpeg_quality) where higher."""
    if "min_jpeg_quality" in spec and scores.get("cell_side_px", np.inf) < ENLARGED_CELL_SIDE_PX:
        return max(MIN_PIXEL_JPEG_QUALITY, int(spec["min_jpeg_quality"]))
    return MIN_PIXEL_JPEG_QUALITY


def motion_bar(spec: dict[str, Any]) -> float:
    """The edge isotropy under which a frame is refused: the runtime's, or a device's own stricter one (an adapted
    bundle's domain.min_edge_isotropy: leukoedge adapt)."""
    return max(MIN_EDGE_ISOTROPY, float(spec.get("min_edge_isotropy", 0.0)))


def edge_isotropy(frame: np.ndarray, halved: Sequence[np.ndarray] = ()) -> float | None:
    """How evenly the frame's steepest edges run every way: the smaller eigenvalue of their gradients' structure tensor
    over the larger, 1 when they point every way alike, towards 0 when all point one way (motion blur softens the
    edges along the motion). None for a frame without enough edges to read. halved: the frame's halvings on the way to
    the segmenter's input (PreparedFrame.halved), which a camera-sized frame shrinks on from."""
    scale = ISOTROPY_SIDE / max(frame.shape[:2])
    if scale * STAGED_SHRINK_REST < 1.0:  # a camera-sized frame: halved first (preprocess.cpu.shrink_frame)
        width, height = round(frame.shape[1] * scale), round(frame.shape[0] * scale)
        # The segmenter's deepest halving that still leaves more than 2 to shrink, as shrink_frame would halve it.
        start = next((level for level in reversed(halved) if min(level.shape[1] / width, level.shape[0] / height) > 2), frame)
        small = shrink_frame(start, width, height)
    else:  # by the scale, as the validated frames' isotropies were read (a size in pixels moves PBC's by 0.008)
        small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1.0 else frame
    grey = cv2.transform(small.astype(np.float32), _CHANNEL_MEAN)  # the channels' mean: either order
    dx, dy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    keep = cv2.dilate((grey <= DARK_LEVEL).astype(np.uint8), _DARK_NEIGHBOURHOOD) == 0
    keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False  # Sobel's border reads reflected pixels
    dx, dy = dx[keep], dy[keep]
    magnitude = dx * dx + dy * dy
    if int(ISOTROPY_EDGE_SHARE * magnitude.size) < 20:
        return None
    # The steepest share's lower bound, read on every 8th value (a partition of all of them cost 0.5 ms).
    sample = magnitude[::8]
    bound = np.partition(sample, int((1.0 - ISOTROPY_EDGE_SHARE) * (sample.size - 1)))[int((1.0 - ISOTROPY_EDGE_SHARE) * (sample.size - 1))]
    edges = magnitude >= bound
    if bound <= 0 or np.count_nonzero(edges) < 20:
        return None
    dx, dy = dx[edges].astype(np.float64), dy[edges].astype(np.float64)
    xx, yy, xy = dx @ dx, dy @ dy, dx @ dy
    mean, spread = (xx + yy) / 2.0, np.sqrt((xx - yy) ** 2 / 4.0 + xy * xy)
    return float((mean - spread) / (mean + spread)) if mean > 0 else None


def noise_level(frame: np.ndarray, boxes: Sequence[Box]) -> float | None:
    """The frame's noise (frame_noise) as the classifier sees its white cells: each cell's box is shrunk to about
    FOCUS_SIZE px a side (its crop), and shrinking by a factor k averages white noise down by k; a cell that is
    enlarged keeps its noise. None without white cells."""
    side = median_cell_side(boxes)
    if side is None:
        return None
    return frame_noise(frame) / max(1.0, side / FOCUS_SIZE)


def frame_scores(
    spec: dict[str, Any],
    captured: np.ndarray,
    frame: np.ndarray,
    prepared: PreparedFrame,
    preprocess: PreprocessSpec,
    jpeg_quality: int | None = None,
    illumination_falloff: float | None = None,
    outside_field: float = 0.0,
    dark: float | None = None,
) -> dict[str, float]:
    """The domain-check scores read before the segmenter runs, from the frame as captured (`captured`: its longest run
    of flat or repeating rows, incomplete_rows; the JPEG quality its pixels hold, decode.pixel_jpeg_quality), the
    corrected frame the models read (preprocess.cpu.corrected_frame: the black left inside the field, dark_share; how
    evenly its steepest edges run every way, edge_isotropy) and the segmenter's input (colour distance; chroma spread,
    bundles with a stain step); passed in: the JPEG quality of its file (bundles with the compression check), its
    light's falloff (preprocess.cpu.illumination_falloff), the share of it outside the field of view and filled
    (preprocess.cpu.fill_outside_field), and its dark share where already read (CorrectedFrame.dark_share)."""
    scores = {
        "colour_distance": colour_distance(spec, colour_features(prepared, preprocess, feature_names(spec))),
        "dark_share": dark_share(frame) if dark is None else float(dark),
        "outside_field": float(outside_field),
        "incomplete_rows": float(incomplete_rows(captured)),
    }
    chroma = chroma_spread(prepared)
    if chroma is not None:
        scores["chroma_spread"] = chroma
    if (isotropy := edge_isotropy(frame, prepared.halved)) is not None:
        scores["edge_isotropy"] = isotropy
    if "min_jpeg_quality" in spec and jpeg_quality is not None:
        scores["jpeg_quality"] = float(jpeg_quality)
    if (in_pixels := pixel_jpeg_quality(captured)) is not None:
        scores["pixel_jpeg_quality"] = float(in_pixels)
    if illumination_falloff is not None:
        scores["illumination_falloff"] = float(illumination_falloff)
    return scores


def cell_scores(spec: dict[str, Any], frame: np.ndarray, prepared: PreparedFrame, probabilities: np.ndarray, cell_boxes: Sequence[Box] = ()) -> dict[str, float]:
    """The domain-check scores read from the segmenter's output and the white cells (cell_boxes: the cells the gate
    kept): the segmenter's uncertainty; where there are white cells, their median side and (bundles with a focus check,
    a noise check) their edge width and the noise they carry, read from the frame's own pixels; where there are none,
    the share of the frame the segmenter marks as white cell (foreground_share)."""
    scores = {"uncertainty": segmenter_uncertainty(prepared, probabilities)}
    side = median_cell_side(cell_boxes)
    if side is not None:
        scores["cell_side_px"] = side
    else:  # no white cell kept: is it an empty field, or one cell larger than the frame shows whole?
        scores["empty_foreground"] = foreground_share(prepared, probabilities)
    if "max_edge_width" in spec and (width := edge_width(frame, cell_boxes, prepared.halved)) is not None:
        scores["edge_width"] = width
    if "max_noise" in spec and (noise := noise_level(frame, cell_boxes)) is not None:
        scores["noise"] = noise
    return scores


# The order of a frame's scores in its verdict (Verdict.domain, the result JSON): frame_scores' and cell_scores' merged.
SCORE_ORDER = (
    "colour_distance", "uncertainty", "dark_share", "outside_field", "incomplete_rows", "chroma_spread", "cell_side_px", "empty_foreground",
    "edge_width", "noise", "edge_isotropy", "jpeg_quality", "pixel_jpeg_quality", "illumination_falloff",
)


def merged_scores(frame_part: dict[str, float], cell_part: dict[str, float]) -> dict[str, float]:
    """A frame's frame_scores and cell_scores as one dict, in SCORE_ORDER."""
    both = {**frame_part, **cell_part}
    return {key: both[key] for key in SCORE_ORDER if key in both}


def domain_scores(
    spec: dict[str, Any],
    captured: np.ndarray,
    frame: np.ndarray,
    prepared: PreparedFrame,
    preprocess: PreprocessSpec,
    probabilities: np.ndarray,
    cell_boxes: Sequence[Box] = (),
    jpeg_quality: int | None = None,
    illumination_falloff: float | None = None,
    outside_field: float = 0.0,
    dark: float | None = None,
) -> dict[str, float]:
    """Every domain-check score of a frame (frame_scores and cell_scores merged): `captured` the frame as captured,
    `frame` the corrected one the models read (preprocess.cpu.corrected_frame). Detector.run computes the two parts
    on a thread of their own, beside the segmenter and the classifier."""
    return merged_scores(
        frame_scores(spec, captured, frame, prepared, preprocess, jpeg_quality, illumination_falloff, outside_field, dark),
        cell_scores(spec, frame, prepared, probabilities, cell_boxes),
    )


DOMAIN_CHECKS = (
    "colour", "uncertainty", "cell_size", "no_colour", "focus", "motion", "noise", "compression", "torn", "cut_cells", "cell_fills_frame", "field_of_view",
    "illumination", "incomplete", "channel_order", "detail",
)

# A frame whose pixels were compressed at a JPEG quality under this is refused (decode.pixel_jpeg_quality, measured as
# captured). The sources' own frames hold 75 (BCCD, PBC, ALL-IDB2, TXL-PBC bcd), 51 (TXL-PBC raabin's files, saved at
# 95 after a compression at 51) or no lattice (Taleqani, Zheng) (scripts/capture_levels.py): the bar lies under every
# validated frame. Not fitted: fitted, it would follow the sources a bundle saw (75 without raabin, refusing raabin's
# frames, which the models judge right), and compression is a camera setting, not a device's look. Validation fields
# handed over as MJPEG camera frames at 40 and below are nearly all refused; at 50-74 those with large cells are
# judged, those with small ones held to the file bar (ENLARGED_CELL_SIDE_PX below) (scripts/capture_study.py --fault jpeg
# --camera; docs/training.md, "Compression read from the pixels").
MIN_PIXEL_JPEG_QUALITY = 45
# Under this side (px) a white cell is enlarged to the classifier's input (64x64 in every bundle so far), and the 8-px
# blocks JPEG leaves with it: Taleqani's cells (median 29 px) lose blasts from camera frames at quality 50-74 (45-48 of 60
# malignant validation fields flagged, 60 raw), raabin's (337 px, pixels at 51) are judged right. A frame whose median
# white cell is smaller than this is held to the bundle's file bar (min_jpeg_quality, 75) in its pixels too
# (pixel_jpeg_bar); no source's own frame falls under it (their pixels hold 75, 51 with raabin's large cells, or none).
ENLARGED_CELL_SIDE_PX = 64.0

# Evened, validation fields whose light fell to 0.3 at one side were judged as captured (every malignant Taleqani field
# flagged; no normal field flagged but one TXL-PBC raabin field already one cell from a false flag, which this and
# other faults tip over); at 0.15 one more benign Taleqani field was flagged (scripts/capture_study.py --fault
# illumination). A frame whose background falls off by more than this is refused.
MAX_FALLOFF = 0.75


def failed_checks(spec: dict[str, Any], scores: dict[str, float]) -> list[str]:
    """Which of DOMAIN_CHECKS the frame's scores fail; [] inside the domain."""
    failed = []
    if scores["colour_distance"] > spec["max_colour_distance"]:
        failed.append("colour")
    if scores["uncertainty"] > spec["max_uncertainty"]:
        failed.append("uncertainty")
    if "min_cell_side_px" in spec and "cell_side_px" in scores and scores["cell_side_px"] < spec["min_cell_side_px"]:
        failed.append("cell_size")
    if "chroma_spread" in scores and scores["chroma_spread"] < MIN_CHROMA_SPREAD:
        failed.append("no_colour")
    if "max_edge_width" in spec and "edge_width" in scores and scores["edge_width"] > spec["max_edge_width"]:
        failed.append("focus")
    if scores.get("edge_isotropy", 1.0) < motion_bar(spec):
        failed.append("motion")
    if "max_noise" in spec and "noise" in scores and scores["noise"] > spec["max_noise"]:
        failed.append("noise")
    if ("min_jpeg_quality" in spec and "jpeg_quality" in scores and scores["jpeg_quality"] < spec["min_jpeg_quality"]) or (
        scores.get("pixel_jpeg_quality", 100.0) < pixel_jpeg_bar(spec, scores)
    ):
        failed.append("compression")
    if scores.get("dark_share", 0.0) > MAX_DARK_SHARE or scores.get("outside_field", 0.0) > MAX_OUTSIDE_FIELD:
        failed.append("field_of_view")
    if scores.get("illumination_falloff", 0.0) > MAX_FALLOFF:
        failed.append("illumination")
    if scores.get("incomplete_rows", 0.0) > MAX_INCOMPLETE:
        failed.append("incomplete")
    if scores.get("tear_score", 0.0) > MAX_TEAR:
        failed.append("torn")
    if scores.get("whole_blasts", np.inf) < MIN_WHOLE_BLASTS:
        failed.append("cut_cells")
    if scores.get("empty_foreground", 0.0) > MAX_EMPTY_FOREGROUND:
        failed.append("cell_fills_frame")
    if scores.get("swapped_colour_gain", 0.0) > SWAP_MARGIN:
        failed.append("channel_order")
    if scores.get("flag_detail", np.inf) < MIN_FLAG_DETAIL:
        failed.append("detail")
    return failed


def outside_domain(spec: dict[str, Any], scores: dict[str, float]) -> str:
    """Why the frame is outside the validated domain, for a person; "" when it is inside."""
    failed = failed_checks(spec, scores)
    reasons = []
    if "no_colour" in failed:
        reasons.append(
            f"almost no colour (a*/b* spread {scores['chroma_spread']:.1f} < {MIN_CHROMA_SPREAD:g}): a greyscale image, a monochrome "
            "camera or an empty field; a stained smear is judged from its colours"
        )
    elif "field_of_view" in failed:  # its black corners make its colours unlike every source too; adapting would not help
        reasons.append(
            f"too much of the frame outside the microscope's field of view or black ({scores.get('outside_field', 0.0):.0%} outside it, "
            f"{scores['dark_share']:.0%} black inside it; at most {MAX_OUTSIDE_FIELD:.0%} and {MAX_DARK_SHARE:.0%}): set the camera's "
            "region of interest inside the field of view, or crop the frames to it"
        )
    elif "colour" in failed:  # a frame without colour is unlike every source too; adapting to it would be wrong
        reasons.append(
            f"colours unlike every validated source (distance {scores['colour_distance']:.2f} > {spec['max_colour_distance']:.2f}): "
            "a new stain, camera or white balance, or the frame's colour channels in another order; "
            "adapt the bundle to this microscope with `leukoedge adapt`"
        )
    if "uncertainty" in failed:
        reasons.append(f"the segmenter is unsure of this field (uncertainty {scores['uncertainty']:.3f} > {spec['max_uncertainty']:.3f})")
    if "cell_size" in failed:
        reasons.append(
            f"white cells too small to judge (median {scores['cell_side_px']:.1f} px across < {spec['min_cell_side_px']:.1f}, half the validated sources' smallest typical cell): "
            "a lower magnification or a coarser camera; use a higher-power objective or a camera with more pixels"
        )
    if "focus" in failed:
        reasons.append(
            f"out of focus (white cells' edges {scores['edge_width']:.2f} wide > {spec['max_edge_width']:.2f}, in 1/{FOCUS_SIZE} of a cell): "
            "focus the microscope on the cells and capture again"
        )
    if "motion" in failed:
        reasons.append(
            f"blurred one way (edge isotropy {scores['edge_isotropy']:.2f} < {motion_bar(spec):.2f}: its edges are soft along "
            "one direction): the stage or the camera moved during the exposure; let the stage settle, shorten the exposure and capture again"
        )
    if "noise" in failed:
        reasons.append(
            f"too noisy (noise of {scores['noise']:.2f} grey levels on the cells as the classifier sees them > {spec['max_noise']:.2f}): "
            "more light, a lower camera gain or a longer exposure"
        )
    if "channel_order" in failed:
        reasons.append(
            f"its colours look like a validated smear's with red and blue swapped (nearer by {scores['swapped_colour_gain']:.2f} swapped back; "
            f"at most {SWAP_MARGIN:.2f}): pass the camera's channel order (Detector.load(..., channel_order=\"RGB\" or \"BGR\"))"
        )
    if "incomplete" in failed:
        reasons.append(
            f"an incomplete or corrupted frame ({scores['incomplete_rows']:.0%} of its rows in one band of a single colour or repeating "
            f"rows; at most {MAX_INCOMPLETE:.0%}): a camera buffer not fully written or a truncated image; capture again"
        )
    if "torn" in failed:
        reasons.append(
            f"a torn frame (rows below one row match those above shifted sideways, {scores['tear_score']:.1f} times better than "
            f"where they stand; at most {MAX_TEAR:.1f}): a camera buffer that lost its line sync; capture again"
        )
    if "cut_cells" in failed:
        reasons.append(
            f"white cells larger than the frame shows whole (its flag rests on blasts cut by the frame's edge that span "
            f"{MAX_CUT_CELL_SHARE:.0%} of its side or more; {scores['whole_blasts']:.0f} whole blast(s), fewer than {MIN_WHOLE_BLASTS}): "
            "a higher magnification than validated, or a region of interest cut around the field's centre; capture the whole field"
        )
    if "detail" in failed:
        reasons.append(
            f"about to be flagged on white cells with less fine detail than validated flags rest on (detail {scores['flag_detail']:.2f} "
            f"< {MIN_FLAG_DETAIL:.2f}): a coarser camera, soft focus or compressed frames; use a camera with more pixels across "
            "a cell or a higher-power objective, focus, and capture uncompressed"
        )
    if "cell_fills_frame" in failed:
        reasons.append(
            f"no whole white cell found, though the segmenter marks white-cell pixels over {scores['empty_foreground']:.0%} of the "
            f"frame (validated frames without one: at most {MAX_EMPTY_FOREGROUND:.0%}): a cell larger than the frame, as under a "
            "higher magnification than validated; capture the whole field"
        )
    if "illumination" in failed:
        reasons.append(
            f"unevenly lit (the background's light falls off by {scores['illumination_falloff']:.0%} across the frame; more than "
            f"{MAX_FALLOFF:.0%} cannot be evened out): centre the lamp and the condenser (Koehler illumination) and capture again"
        )
    if "compression" in failed:
        if scores.get("jpeg_quality", 100.0) < spec.get("min_jpeg_quality", 0):
            reasons.append(
                f"compressed harder than any validated source (JPEG quality {scores['jpeg_quality']:.0f} < {spec['min_jpeg_quality']:.0f}): "
                f"save the frames uncompressed (PNG) or at JPEG quality {spec['min_jpeg_quality']:.0f} or more"
            )
        elif (bar := pixel_jpeg_bar(spec, scores)) > MIN_PIXEL_JPEG_QUALITY:
            reasons.append(
                f"compressed too hard for white cells this small (its pixels hold JPEG quality {scores['pixel_jpeg_quality']:.0f} < "
                f"{bar} where the cells are {scores['cell_side_px']:.0f} px across, under "
                f"{ENLARGED_CELL_SIDE_PX:.0f}): set the camera to uncompressed frames, or use a higher-power objective"
            )
        else:
            reasons.append(
                f"compressed harder than any validated frame (its pixels hold JPEG quality {scores['pixel_jpeg_quality']:.0f} < "
                f"{MIN_PIXEL_JPEG_QUALITY}): set the camera to uncompressed frames, or MJPEG at a higher quality"
            )
    return "; ".join(reasons)


def smallest_typical_side(cell_sides: Sequence[float] | None, sources: Sequence[str]) -> float | None:
    """The smallest, over sources with at least MIN_SIDE_FIELDS frames with a white cell, of the median of their
    frames' median cell sides (NaN: no white cell); None where no source has that many."""
    if cell_sides is None:
        return None
    sides, names = np.asarray(cell_sides, np.float64), np.asarray(sources)
    if len(sides) != len(names):
        raise ValueError(f"{len(sides)} cell sides for {len(names)} frames' sources")
    typical = []
    for name in sorted(set(sources)):
        own = sides[(names == name) & np.isfinite(sides)]
        if own.size >= MIN_SIDE_FIELDS:
            typical.append(float(np.median(own)))
    return min(typical) if typical else None


def widest_source_bar(uncertainty: np.ndarray, sources: Sequence[str]) -> float:
    """The loosest uncertainty bar unlabelled `leukoedge adapt` may give a device (adapt.device_uncertainty_bar): the
    widest one validated source needs on its own by the fit rule (THRESHOLD_QUANTILE x THRESHOLD_MARGIN of its frames).
    The segmenter's uncertainty differs by microscope (a softer, more magnified one's boundaries are wider: TXL-PBC
    raabin's median is twice BCCD's) while its masks there are right, so a device may be as unsure as the least sure
    validated source, not more."""
    names = np.asarray(sources)
    return max(float(np.quantile(uncertainty[names == name], THRESHOLD_QUANTILE) * THRESHOLD_MARGIN) for name in sorted(set(sources)))


def fit_domain(
    colour: Sequence[np.ndarray],
    uncertainty: Sequence[float],
    sources: Sequence[str],
    seed: int = 0,
    cell_sides: Sequence[float] | None = None,
    features: Sequence[str] = COLOUR_FEATURES,
    edge_widths: Sequence[float] | None = None,
    noise_levels: Sequence[float] | None = None,
    jpeg_qualities: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The manifest's "domain" section from fitting frames' colour features (colour_features with `features`),
    uncertainties and (optional) median white-cell sides, edge widths (edge_width) and noise levels (noise_level),
    NaN for a frame without white cells, and the JPEG qualities of their files (NaN for a file of another format).

    References: up to MAX_REFERENCES frames, spread evenly over the sources. Thresholds, each with THRESHOLD_MARGIN
    of headroom: colour, the largest of the fitting frames' leave-one-out distances (each frame's to the nearest other
    reference), so that no validated frame is outside; uncertainty and edge width, the THRESHOLD_QUANTILE of theirs (and
    max_device_uncertainty, the widest uncertainty bar one source needs on its own: widest_source_bar); noise,
    the NOISE_QUANTILE (the largest); JPEG quality, the lowest of theirs, without margin (a quality is the file's own
    setting, not a measurement with a spread);
    the smallest cell side, MIN_CELL_SIDE_SHARE of the smallest-celled source's typical side. Colour takes the largest, not a quantile: a source with a wide palette
    (Taleqani's) has its own tail, which the 0.99 quantile cut into (docs/training.md, "Bundle 0.7.0").
    """
    colour = np.asarray(colour, np.float64)
    uncertainty = np.asarray(uncertainty, np.float64)
    if len(colour) < 2 or len(colour) != len(uncertainty):
        raise ValueError(f"fit_domain needs at least 2 frames with one colour vector and one uncertainty each, got {len(colour)} and {len(uncertainty)}")
    if colour.shape[1] != len(features):
        raise ValueError(f"colour vectors of {colour.shape[1]} numbers for {len(features)} features {list(features)}")
    rng = np.random.default_rng(seed)
    names = sorted(set(sources))
    per_source = max(1, MAX_REFERENCES // len(names))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(np.asarray(sources) == name))[:per_source] for name in names])
    references = colour[np.sort(chosen)]
    spread = np.maximum(references.std(axis=0), [MIN_FEATURE_SPREAD[name] for name in features])
    distances = np.sqrt((((colour[:, None, :] - references[None, :, :]) / spread) ** 2).mean(axis=2))
    is_itself = np.all(colour[:, None, :] == references[None, :, :], axis=2)
    distances[is_itself] = np.inf  # leave-one-out: a reference is not its own nearest neighbour
    nearest = distances.min(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    spec = {
        "colour_features": list(features),
        "colour_references": np.round(references, 3).tolist(),
        "colour_spread": np.round(spread, 4).tolist(),
        "max_colour_distance": float(nearest.max() * THRESHOLD_MARGIN),
        "max_uncertainty": float(np.quantile(uncertainty, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN),
        "max_device_uncertainty": widest_source_bar(uncertainty, sources),
        "fitted_on": {"frames": int(len(colour)), "sources": {name: int(np.sum(np.asarray(sources) == name)) for name in names}},
    }
    if (smallest := smallest_typical_side(cell_sides, sources)) is not None:
        spec["min_cell_side_px"] = MIN_CELL_SIDE_SHARE * smallest
    widths = np.asarray([] if edge_widths is None else edge_widths, np.float64)
    widths = widths[np.isfinite(widths)]
    if widths.size:
        spec["max_edge_width"] = float(np.quantile(widths, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    noise = np.asarray([] if noise_levels is None else noise_levels, np.float64)
    noise = noise[np.isfinite(noise)]
    if noise.size:
        spec["max_noise"] = float(np.quantile(noise, NOISE_QUANTILE) * THRESHOLD_MARGIN)
    qualities = np.asarray([] if jpeg_qualities is None else jpeg_qualities, np.float64)
    qualities = qualities[np.isfinite(qualities)]
    if qualities.size:
        spec["min_jpeg_quality"] = int(qualities.min())
    return spec
