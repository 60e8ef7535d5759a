"""`leukoedge adapt`: tune a bundle's device-dependent parts to a new microscope from its unlabelled frames.

What depends on the device and can be re-estimated without labels is the domain check (leukoedge/domain.py):
the new microscope's frames join the colour references, so its own colours are no longer "outside the
validated domain". What is NOT changed, and why:
- the stain reference: every frame is already normalized to it with its own statistics (Reinhard), which
  is what maps a new stain onto what the models learned; moving the reference would move every model's input;
- the uncertainty threshold, where the segmenter is unsure of much of the device: more than MAX_UNSURE_SHARE of its
  frames beyond the bundle's bar. Without labels nothing shows that its answers there are right, and where that
  happened (TXL-PBC raabin under 0.14.0's segmenter, 0.38 of its fields) the unsure frames were the ones the
  classifier got wrong, so they stay refused. Where the segmenter is sure of most of the device, the bar becomes the
  device's own by the fit rule, at most the widest one validated source needed (domain.widest_source_bar): a softer or
  more magnified microscope is a little less sure of every boundary, as raabin is with its masks right
  (device_uncertainty_bar);
- the models' weights (no labels). With a few dozen labelled frames, `leukoedge adapt --labels` fine-tunes the
  gate and the classifier and widens the uncertainty threshold (training/adapt.py).
The focus threshold (DEVICE_BARS: domain.max_edge_width) and the motion bar (domain.MIN_EDGE_ISOTROPY, a runtime
constant the adapted bundle may raise with domain.min_edge_isotropy) become the device's own where that is stricter: the
bundle's must pass every validated source's softest fields, so it refuses only gross defocus; one device's frames in
focus spread far less, and a frame blurrier than the device's usual is then refused. It is never loosened: a device
softer than any validated source stays refused. Held-back frames only the device's own bar refuses are counted on
their own (AdaptReport.beyond_own_bars_after), not as the adaptation doing worse: that bar is the device's, not a
fault of the fit. The noise threshold (domain.max_noise) is not made the device's own: how noisy a device usually
is says nothing of what harms the classifier (PBC's fields measure under 0.2 as captured, and their white-cell types
held at 1.0, five times that: docs/training.md, "Bundle 0.12.0: sensor noise"); the bundle's bar is where the
validated noise ends.
Frames that do not belong to the device's colours are left out of the fit and named: a frame without stain colour
(a greyscale image, an empty field: domain.MIN_CHROMA_SPREAD) and a frame unlike every other frame of the device
(UNLIKE_FACTOR: another stain, a swapped channel order, a file from another microscope), and a frame mostly outside
the microscope's field of view or black inside it (domain.MAX_OUTSIDE_FIELD, MAX_DARK_SHARE; a frame less far outside
is measured with its outside filled, as the runtime reads it: preprocess.cpu.corrected_frame), and an incomplete
frame (domain.MAX_INCOMPLETE: a band of rows of one colour). One such frame
would otherwise become a reference and widen the threshold until the colour check refused nothing.
A device whose frames look swapped as a set (red and blue; refuse_swapped_channels) is refused, naming the other
channel order: its swapped colours must not become its references.
A part of the frames (hold_back) is kept out of the fit; the new bundle is written only if it refuses no more
of those held-back frames than the original did. Without labels, flags are not right or wrong: the report
prints how many held-back frames each bundle flags, for a person to look at (a field kit session's review).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .bundle import save_bundle
from .detector import Detector
from .domain import (
    MAX_DARK_SHARE,
    MAX_INCOMPLETE,
    MAX_OUTSIDE_FIELD,
    MAX_REFERENCES,
    MIN_CHROMA_SPREAD,
    MIN_EDGE_ISOTROPY,
    SWAP_MARGIN,
    THRESHOLD_MARGIN,
    THRESHOLD_QUANTILE,
    chroma_spread,
    colour_distance,
    colour_features,
    failed_checks,
    feature_names,
    outside_domain,
    segmenter_uncertainty,
    swapped_colour_gain,
)
from .errors import LeukoedgeError
from .preprocess.cpu import corrected_frame

log = logging.getLogger("leukoedge.adapt")

MIN_FRAMES = 20  # fewer frames say too little about a device to move the domain check
DEFAULT_HOLD_BACK = 0.2
HOLD_BACK_RANGE = (0.05, 0.5)  # fewer held back check too little; more leave too few to fit
# What labelled adaptation (`leukoedge adapt --labels`, training/adapt.py) can fine-tune.
ADAPTABLE_MODELS = ("segmenter", "refiner", "gate", "classifier")
# Fine-tuned unless told otherwise: the refiner is left as it is by default; once the segmenter knows the device most
# cells skip it (refiner.skip_below_uncertainty), and left out of a device it measured the same (docs/training.md).
DEFAULT_ADAPTED_MODELS = ("segmenter", "gate", "classifier")
# Of each fine-tuning batch, the device's examples; the rest are the training sources' (replayed, so the models keep
# what they learnt). A refused adaptation may pass at a lower share: bcd's did at 0.125 (docs/training.md).
DEFAULT_DEVICE_SHARE = 0.25
# How many times as often labelled adaptation's segmenter and refiner replay Taleqani's fields and cells: at training's
# balance (1) the masks fine-tuned on a device lost Taleqani's whole-cell Dice and flags (TXL-PBC bcd left out: 0.936 ->
# 0.926); at 3 both devices left out gained it (bcd 0.941, raabin 0.934 -> 0.944) (docs/training.md).
DEFAULT_TALEQANI_MASK_WEIGHT = 3.0


class AdaptationRefused(LeukoedgeError):
    """The adapted bundle did worse than the original on the held-back frames, or there were too few frames."""


@dataclass
class FrameMeasure:
    colour: np.ndarray
    uncertainty: float
    refused: bool
    flagged: bool
    chroma: float | None = None  # domain.chroma_spread (None: the bundle has no stain step)
    scores: dict[str, float] = field(default_factory=dict)  # the run's domain scores (domain.domain_scores)


@dataclass
class AdaptReport:
    frames: int
    held_back: int
    refused_before: int
    refused_after: int
    flagged_before: int
    flagged_after: int
    written: bool
    # DEVICE_BARS' thresholds the bundle has: domain key -> (the bundle's, the adapted one)
    own_bars: dict[str, tuple[float, float]] = field(default_factory=dict)
    beyond_own_bars_after: int = 0  # held-back frames only the device's own bars refuse
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why -> names of the frames left out of the fit
    out: str = ""  # where the bundle was written
    # The checks (domain.DOMAIN_CHECKS) that still refuse held-back frames after adaptation -> how many frames each refuses
    refusing_after: dict[str, int] = field(default_factory=dict)
    uncertainty_bar: tuple[float, float] = (0.0, 0.0)  # the bundle's uncertainty threshold, the adapted one
    unsure_share: float = 0.0  # of the fitted frames, the share beyond the bundle's uncertainty threshold

    @property
    def uncertainty_widened(self) -> bool:
        return self.uncertainty_bar[1] != self.uncertainty_bar[0]

    @property
    def all_refused_after(self) -> bool:
        """Every held-back frame is still refused after adaptation: nothing of the device is judged (a capture fault, or
        frames that are not smears), so no bundle is written."""
        return self.held_back > 0 and self.refused_after == self.held_back

    @property
    def tightened(self) -> list[str]:
        """The domain keys of the bars set to the device's own (stricter than the bundle's)."""
        return [key for key, (bundle_bar, device_bar) in self.own_bars.items() if device_bar != bundle_bar]

    def lines(self) -> list[str]:
        fitted = self.frames - self.held_back - sum(len(names) for names in self.left_out.values())
        return [
            f"frames: {self.frames} ({fitted} fitted, {self.held_back} held back)",
            *(f"left out of the fit, {why}: {len(names)} ({_some(names)})" for why, names in self.left_out.items() if names),
            f"held-back frames refused (outside the domain): {self.refused_before} before, {self.refused_after} after",
            *(f"{DEVICE_BARS[key][1]} threshold ({DEVICE_BARS[key][0]}): {self.own_bars[key][0]:.3g} -> {self.own_bars[key][1]:.3g}, the device's own"
              for key in self.tightened),
            *([f"held-back frames beyond only the device's own {' and '.join(DEVICE_BARS[key][1] for key in self.tightened)} bar: "
               f"{self.beyond_own_bars_after}"] if self.tightened else []),
            *([f"uncertainty threshold: {self.uncertainty_bar[0]:.3g} -> {self.uncertainty_bar[1]:.3g}, the device's own "
               f"({self.unsure_share:.0%} of its fitted frames were beyond the bundle's)"] if self.uncertainty_widened else []),
            *([f"uncertainty threshold kept at {self.uncertainty_bar[0]:.3g}: the segmenter is unsure of {self.unsure_share:.0%} of the "
               f"device's fitted frames (more than {MAX_UNSURE_SHARE:.0%}), which stay refused; `leukoedge adapt --labels` fine-tunes it "
               "on the device"] if self.unsure_share > MAX_UNSURE_SHARE else []),
            f"held-back frames flagged: {self.flagged_before} before, {self.flagged_after} after",
            f"adapted bundle written to {self.out}" if self.written else self.not_written_reason(),
            *(["only the domain check was adapted, not the models: validate the bundle on the device's own smears against a "
               "hematologist's reading before relying on it (docs/integration.md, field sessions)"] if self.written else []),
        ]


    def not_written_reason(self) -> str:
        if self.all_refused_after:
            checks = ", ".join(f"{check} {count}" for check, count in sorted(self.refusing_after.items(), key=lambda item: (-item[1], item[0])))
            return (
                f"bundle NOT written: every held-back frame is still refused after adaptation (by check: {checks}); adaptation re-fits "
                "the device's colours, not its capture: fix what those checks name (focus, noise, compression, ...) or check that the "
                "frames are stained smears, then adapt again"
            )
        return "bundle NOT written: it did worse on the held-back frames"


def _some(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def measure(detector: Detector, frame: np.ndarray, jpeg_quality: int | None = None) -> FrameMeasure:
    """A frame's domain features and whether the detector refuses or flags it. jpeg_quality: its file's (None: a camera
    frame or not a JPEG), for the compression check, as Detector.run takes it."""
    # On the frame as captured: its field-of-view, light and completeness scores are that frame's.
    result = detector.run(frame, jpeg_quality=jpeg_quality)
    scores = dict(result.verdict.domain or {})
    corrected = corrected_frame(frame)[0]  # the frame the run's models read, whose colours the check compares
    if "uncertainty" in scores:  # the run measured it: only the colour features are read again, without the models
        prepared, uncertainty = detector.prepare_frame(corrected), scores["uncertainty"]
    else:  # a frame too small to judge was not measured
        found = detector.candidates(corrected)
        prepared, uncertainty = found.prepared, segmenter_uncertainty(found.prepared, found.probabilities)
    return FrameMeasure(
        colour_features(prepared, detector.spec, feature_names(detector.domain_spec)),
        uncertainty,
        result.verdict.status == "outside_domain",
        result.verdict.flagged,
        chroma_spread(prepared),
        scores,
    )


NO_COLOUR = "without stain colour"
OUTSIDE_FIELD = "black outside the field of view"
INCOMPLETE = "incomplete or corrupted"
UNLIKE_THE_OTHERS = "unlike the device's other frames"
# A frame is unlike the device's others when its nearest other frame is further than both the bundle's colour threshold
# and this many times the device's median such distance: one device's frames lie within a few medians of their
# nearest, a frame of another stain or with its channels swapped far beyond (tests/runtime/test_adapt.py).
UNLIKE_FACTOR = 5.0


def nearest_other(colours: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Each frame's colour distance (domain.colour_distance's, in units of the references' spread) to the nearest
    other frame of the same set."""
    distances = np.sqrt((((colours[:, None, :] - colours[None, :, :]) / spread) ** 2).mean(axis=2))
    np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1)


def unfit_frames(domain: dict[str, Any], measures: Sequence[FrameMeasure]) -> dict[str, np.ndarray]:
    """Which of the device's frames must not shape its colour references (see the module doc), by reason: boolean
    masks over `measures`. Distances between frames with colour, in units of the references' spread."""
    no_colour = np.array([m.chroma is not None and m.chroma < MIN_CHROMA_SPREAD for m in measures], bool)
    unlike = np.zeros(len(measures), bool)
    coloured = np.flatnonzero(~no_colour)
    if len(coloured) >= 2:
        nearest = nearest_other(np.array([measures[index].colour for index in coloured]), np.asarray(domain["colour_spread"], np.float64))
        unlike[coloured] = nearest > max(float(domain["max_colour_distance"]), UNLIKE_FACTOR * float(np.median(nearest)))
    outside_field = np.array([
        m.scores.get("dark_share", 0.0) > MAX_DARK_SHARE or m.scores.get("outside_field", 0.0) > MAX_OUTSIDE_FIELD for m in measures
    ], bool)
    incomplete = np.array([m.scores.get("incomplete_rows", 0.0) > MAX_INCOMPLETE for m in measures], bool)
    return {
        NO_COLOUR: no_colour, UNLIKE_THE_OTHERS: unlike, OUTSIDE_FIELD: outside_field & ~no_colour & ~unlike,
        INCOMPLETE: incomplete & ~outside_field & ~no_colour & ~unlike,
    }


def adapted_domain(domain: dict[str, Any], fitted: Sequence[FrameMeasure], seed: int = 0, labelled: bool = False) -> dict[str, Any]:
    """The domain section with the device's frames among the colour references (the spread is kept, so
    distances stay comparable), the colour threshold raised to cover the device's own spread if needed and the
    uncertainty threshold as device_uncertainty_bar says; the frames of unfit_frames left out.
    labelled: the frames' boxes were learnt and the result checked on held-back labelled frames
    (training/adapt.py), so the uncertainty threshold is raised to cover the device's frames whatever their share,
    by the rule it was fitted with (domain.fit_domain)."""
    adapted = copy.deepcopy(domain)
    unfit = np.logical_or.reduce(list(unfit_frames(domain, fitted).values()))
    fitted = [measure for measure, left_out in zip(fitted, unfit) if not left_out]
    if len(fitted) < 2:
        raise AdaptationRefused(
            f"only {len(fitted)} of the device's frames have stain colour, are alike and hold no black outside the field of view: "
            "check that the folder holds colour frames of stained smears from one microscope, cropped to its field of view"
        )
    device = np.array([measure.colour for measure in fitted])
    for key in DEVICE_BARS:
        if (bar := bundle_bar(domain, key)) is None:
            continue
        own = device_threshold(bar, fitted, key)
        if key in domain or own != bar:  # a runtime bar is written only where the device's own is stricter
            adapted[key] = own
    rng = np.random.default_rng(seed)
    keep_device = rng.permutation(len(device))[: MAX_REFERENCES // 2]
    original = np.asarray(domain["colour_references"], np.float64)
    keep_original = rng.permutation(len(original))[: MAX_REFERENCES - len(keep_device)]
    adapted["colour_references"] = np.round(np.concatenate([original[np.sort(keep_original)], device[np.sort(keep_device)]]), 3).tolist()
    own = float(np.quantile(nearest_other(device, np.asarray(domain["colour_spread"], np.float64)), THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    adapted["max_colour_distance"] = max(float(domain["max_colour_distance"]), own)
    uncertainty = np.array([measure.uncertainty for measure in fitted])
    if labelled:
        adapted["max_uncertainty"] = max(float(domain["max_uncertainty"]), float(np.quantile(uncertainty, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN))
    else:
        adapted["max_uncertainty"] = device_uncertainty_bar(domain, uncertainty)
    return adapted


# Unlabelled adaptation makes the uncertainty bar the device's own only where at most this share of the device's
# frames lie beyond the bundle's: issue 20's bar for refusals before adaptation. Beyond it the segmenter is lost on
# the device, not a little less sure of it (module doc).
MAX_UNSURE_SHARE = 0.10


def unsure_share(domain: dict[str, Any], uncertainty: np.ndarray) -> float:
    """The share of the device's frames beyond the bundle's uncertainty bar."""
    return float(np.mean(uncertainty > float(domain["max_uncertainty"])))


def device_uncertainty_bar(domain: dict[str, Any], uncertainty: np.ndarray) -> float:
    """The uncertainty threshold unlabelled adaptation gives a device (module doc): the fit rule over its frames
    (THRESHOLD_QUANTILE x THRESHOLD_MARGIN), at most the widest a validated source needed (domain.max_device_uncertainty),
    never below the bundle's; the bundle's own where more than MAX_UNSURE_SHARE of the frames lie beyond it, or where
    the bundle was fitted before it held max_device_uncertainty."""
    bar = float(domain["max_uncertainty"])
    if "max_device_uncertainty" not in domain or unsure_share(domain, uncertainty) > MAX_UNSURE_SHARE:
        return bar
    own = float(np.quantile(uncertainty, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    return max(bar, min(float(domain["max_device_uncertainty"]), own))


# The capture checks whose thresholds a device's frames may tighten (see the module doc): domain key -> the score
# it bounds (domain.domain_scores) and the check's name for people. A "max_" key bounds its score from above, a "min_"
# key from below. The motion bar is a runtime constant (domain.MIN_EDGE_ISOTROPY) that an adapted bundle may raise.
DEVICE_BARS = {"max_edge_width": ("edge_width", "focus"), "min_edge_isotropy": ("edge_isotropy", "motion")}
RUNTIME_BARS = {"min_edge_isotropy": MIN_EDGE_ISOTROPY}  # the bars a bundle holds without a key of its own
MIN_DEVICE_BAR_FRAMES = 20  # a device's frames with the score needed to set its own bar


def bundle_bar(domain: dict[str, Any], key: str) -> float | None:
    """The threshold `key` of DEVICE_BARS as the bundle applies it: its own, the runtime's, or None (no such check)."""
    return float(domain[key]) if key in domain else RUNTIME_BARS.get(key)


def device_threshold(bundle_threshold: float, fitted: Sequence[FrameMeasure], key: str) -> float:
    """The threshold `key` of DEVICE_BARS for the device: the fit rule (domain.fit_domain's quantile and margin) over
    its frames' score, where that is stricter than the bundle's and MIN_DEVICE_BAR_FRAMES frames have the score to
    measure (white cells for focus, edges for motion); the bundle's otherwise (see the module doc)."""
    score = DEVICE_BARS[key][0]
    values = np.array([measure.scores[score] for measure in fitted if score in measure.scores], np.float64)
    if len(values) < MIN_DEVICE_BAR_FRAMES:
        return bundle_threshold
    if key.startswith("min_"):
        return max(bundle_threshold, float(np.quantile(values, 1.0 - THRESHOLD_QUANTILE) / THRESHOLD_MARGIN))
    return min(bundle_threshold, float(np.quantile(values, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN))


def adapted_version(version: str, frame_sha256: Sequence[str]) -> str:
    """The adapted bundle's model_version: the original's with build metadata naming the frames it was adapted to
    (semantic versioning's "+"), so every result it gives says it is not the shipped bundle, and which adaptation."""
    digest = hashlib.sha256("".join(sorted(frame_sha256)).encode()).hexdigest()[:8]
    return f"{version.split('+')[0]}+adapted.{digest}"


def held_back(names: Sequence[str], share: float = DEFAULT_HOLD_BACK) -> np.ndarray:
    """True for held-back frames: chosen by a hash of the name, so reruns hold back the same frames; every fifth
    frame where the hash holds back none or all of them (too few frames)."""
    scores = np.array([int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for name in names])
    held = scores < share
    if held.all() or not held.any():
        held = np.arange(len(names)) % 5 == 0
    return held


def adapt_bundle(
    bundle_path: str | Path,
    frames: Sequence[np.ndarray],
    names: Sequence[str],
    out_dir: str | Path,
    hold_back: float = DEFAULT_HOLD_BACK,
    channel_order: str = "BGR",
    jpeg_qualities: Sequence[int | None] | None = None,
) -> AdaptReport:
    """Adapt a bundle's domain check to a device's unlabelled frames and write it to out_dir (see module doc).

    frames: any sequence; each frame is read once to measure it and again only if it is held back, so a sequence
    that reads its frame from disk on indexing (the CLI's) keeps one frame in memory at a time, not hundreds.
    jpeg_qualities: each frame's file JPEG quality (decode.read_image_file; None where not a JPEG), so that the
    compression check judges them as `leukoedge run` does; None: camera frames, none read from a file."""
    if len(frames) < MIN_FRAMES:
        raise AdaptationRefused(f"adaptation needs at least {MIN_FRAMES} frames of the device, got {len(frames)}")
    qualities = list(jpeg_qualities) if jpeg_qualities is not None else [None] * len(frames)
    if len(qualities) != len(frames):
        raise ValueError(f"{len(qualities)} JPEG qualities for {len(frames)} frames")
    if not HOLD_BACK_RANGE[0] <= hold_back <= HOLD_BACK_RANGE[1]:
        raise ValueError(f"hold_back must be between {HOLD_BACK_RANGE[0]} and {HOLD_BACK_RANGE[1]}, got {hold_back}")
    detector = Detector.load(bundle_path, channel_order=channel_order)
    domain = detector.domain_spec
    if domain is None:
        raise AdaptationRefused(f"bundle {detector.bundle.name} has no domain check to adapt (made before 0.2.0); retrain it")
    measures, hashes = [], []
    for index in _progress(range(len(frames)), "measuring the device's frames"):
        frame = frames[index]
        measures.append(measure(detector, frame, qualities[index]))
        hashes.append(hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest())
    held = held_back(names, hold_back)
    fitting = np.flatnonzero(~held)
    refuse_swapped_channels(detector, frames, measures, fitting, channel_order)
    fitting_measures = [measures[index] for index in fitting]
    unfit = unfit_frames(domain, fitting_measures)
    left_out = {why: [names[fitting[index]] for index in np.flatnonzero(mask)] for why, mask in unfit.items()}
    in_fit = np.logical_not(np.logical_or.reduce(list(unfit.values())))
    adapted = adapted_domain(domain, fitting_measures)
    # Every check again, with the adapted colour references (the others' scores do not change with them), and the
    # bundle's capture bars: frames beyond only the device's own are counted apart (see the module doc).
    with_bundle_bars = {**{key: value for key, value in adapted.items() if key not in DEVICE_BARS}, **{key: domain[key] for key in DEVICE_BARS if key in domain}}
    held_scores = [{**m.scores, "colour_distance": colour_distance(adapted, m.colour), "uncertainty": m.uncertainty} for m, h in zip(measures, held) if h]
    failed_after = [failed_checks(with_bundle_bars, scores) for scores in held_scores]
    after = [bool(failed) for failed in failed_after]
    refusing_after = Counter(check for failed in failed_after for check in failed)
    beyond_own_bars = [not refused and bool(outside_domain(adapted, scores)) for refused, scores in zip(after, held_scores)]
    flagged_after = sum(_judged_flag(detector, frames[index], adapted, qualities[index]) for index in np.flatnonzero(held))
    held_measures = [m for m, h in zip(measures, held) if h]
    report = AdaptReport(
        frames=len(frames),
        held_back=int(held.sum()),
        refused_before=sum(m.refused for m in held_measures),
        refused_after=sum(after),
        flagged_before=sum(m.flagged for m in held_measures),
        flagged_after=int(flagged_after),
        written=False,
        left_out=left_out,
        own_bars={key: (bar, float(adapted.get(key, bar))) for key in DEVICE_BARS if (bar := bundle_bar(domain, key)) is not None},
        beyond_own_bars_after=sum(beyond_own_bars),
        refusing_after=dict(refusing_after),
        uncertainty_bar=(float(domain["max_uncertainty"]), float(adapted["max_uncertainty"])),
        unsure_share=unsure_share(domain, np.array([m.uncertainty for m, kept in zip(fitting_measures, in_fit) if kept])),
    )
    if report.refused_after > report.refused_before or report.all_refused_after:
        return report
    manifest = copy.deepcopy(detector.bundle.manifest)
    manifest["domain"] = adapted
    manifest["model_version"] = adapted_version(manifest["model_version"], hashes)
    manifest["adaptation"] = {
        "date": dt.date.today().isoformat(),
        "adapted": [
            "domain.colour_references", "domain.max_colour_distance", *(f"domain.{key}" for key in report.tightened),
            *(["domain.max_uncertainty"] if report.uncertainty_widened else []),
        ],
        "frames": len(frames),
        "held_back": report.held_back,
        "left_out_of_the_fit": left_out,
        "frame_sha256": hashes,
        "gate": {key: getattr(report, key) for key in ("refused_before", "refused_after", "flagged_before", "flagged_after", "beyond_own_bars_after")},
    }
    files = {name: detector.bundle.path(name) for name in manifest["files"]}
    save_bundle(Path(out_dir), manifest, files)
    report.written, report.out = True, str(out_dir)
    return report


# A device whose every frame arrives with red and blue swapped (an integration mistake) would otherwise become its own
# reference: its swapped colours adapted in, and the flag's channel-order check (domain.swapped_colour_gain) blind to
# them. The check reads CHANNEL_ORDER_FRAMES of the frames the fit would use.
CHANNEL_ORDER_FRAMES = 20


def refuse_swapped_channels(detector: Detector, frames: Sequence[np.ndarray], measures: Sequence[FrameMeasure], fitting: np.ndarray, channel_order: str) -> None:
    """AdaptationRefused where the device's frames, as a set (the median of CHANNEL_ORDER_FRAMES of them), come nearer
    the bundle's validated colours with red and blue swapped by more than domain.SWAP_MARGIN."""
    domain, input_size = detector.domain_spec, detector.segmenter_spec["input_size"]
    chosen = fitting[np.linspace(0, len(fitting) - 1, min(CHANNEL_ORDER_FRAMES, len(fitting))).round().astype(int)]
    gains = [
        swapped_colour_gain(domain, corrected_frame(frames[index])[0], colour_distance(domain, measures[index].colour), detector.spec, input_size, channel_order)
        for index in chosen
    ]
    if gains and float(np.median(gains)) > SWAP_MARGIN:
        other = "RGB" if channel_order == "BGR" else "BGR"
        raise AdaptationRefused(
            f"the device's frames look like a validated smear's with red and blue swapped (their colours come {np.median(gains):.2f} nearer "
            f"the validated ones swapped back; at most {SWAP_MARGIN:.2f}): read them as {other} (--channel-order {other}), not {channel_order}"
        )


def _progress(indices: range, description: str) -> Iterable[int]:
    """The frame indices, with a progress bar on a terminal where tqdm is installed (the runtime does not need it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return indices
    return tqdm(indices, desc=description, unit="frame", leave=False)


def _judged_flag(detector: Detector, frame: np.ndarray, domain: dict[str, Any], jpeg_quality: int | None = None) -> bool:
    """Whether the frame is flagged under another domain section (the models unchanged)."""
    original = detector.domain_spec
    detector.domain_spec = domain
    try:
        return detector.run(frame, jpeg_quality=jpeg_quality).verdict.flagged
    finally:
        detector.domain_spec = original
