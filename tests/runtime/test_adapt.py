"""`leukoedge adapt`: a bundle's domain check re-fitted to a new microscope's unlabelled frames."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import Detector
from leukoedge.adapt import (
    MIN_DEVICE_BAR_FRAMES,
    NO_COLOUR,
    INCOMPLETE,
    OUTSIDE_FIELD,
    UNLIKE_THE_OTHERS,
    AdaptationRefused,
    FrameMeasure,
    adapt_bundle,
    MAX_UNSURE_SHARE,
    adapted_domain,
    device_threshold,
    device_uncertainty_bar,
    held_back,
    unfit_frames,
)
from leukoedge.bundle import load_bundle, save_bundle
from leukoedge.cli import main
from leukoedge.domain import THRESHOLD_MARGIN, THRESHOLD_QUANTILE, colour_features, fit_domain, median_cell_side, segmenter_uncertainty

REPO = Path(__file__).resolve().parents[2]
DEVICE_FRAMES = 24


def _frames(folder: Path, count: int) -> list[np.ndarray]:
    return [cv2.imread(str(path)) for path in sorted(folder.glob("*.jpg"))[:count]]


@pytest.fixture(scope="module")
def pbc_only_bundle(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped models with a domain check fitted on PBC fields only: BCCD fields are a new device to it."""
    detector = Detector.load(REPO / "models" / "default")
    colour, uncertainty = [], []
    for frame in _frames(data_root / "pbc" / "images" / "neutrophil", 30):
        found = detector.candidates(frame)
        colour.append(colour_features(found.prepared, detector.spec))
        uncertainty.append(segmenter_uncertainty(found.prepared, found.probabilities))
    manifest = copy.deepcopy(detector.bundle.manifest)
    manifest["domain"] = fit_domain(colour, uncertainty, ["pbc"] * len(colour))
    out = tmp_path_factory.mktemp("pbc-only") / "bundle"
    save_bundle(out, manifest, {name: detector.bundle.path(name) for name in manifest["files"]})
    return out


def test_adapting_to_a_new_device_stops_refusing_its_frames(pbc_only_bundle: Path, data_root: Path, tmp_path: Path) -> None:
    frames = _frames(data_root / "bccd" / "images", DEVICE_FRAMES)
    before = Detector.load(pbc_only_bundle)
    assert sum(before.run(frame).verdict.status == "outside_domain" for frame in frames) >= DEVICE_FRAMES // 2
    report = adapt_bundle(pbc_only_bundle, frames, [f"bccd-{index}" for index in range(len(frames))], tmp_path / "adapted")
    assert report.written and report.refused_after < report.refused_before
    adapted = load_bundle(tmp_path / "adapted")
    record = adapted.manifest["adaptation"]
    assert record["frames"] == DEVICE_FRAMES and len(record["frame_sha256"]) == DEVICE_FRAMES
    assert record["adapted"] == ["domain.colour_references", "domain.max_colour_distance"]
    after = Detector.load(tmp_path / "adapted")
    assert sum(after.run(frame).verdict.status == "outside_domain" for frame in frames) < DEVICE_FRAMES // 4


def test_adapt_refuses_too_few_frames_and_bundles_without_a_domain_check(pbc_only_bundle: Path, data_root: Path, tmp_path: Path) -> None:
    frames = _frames(data_root / "bccd" / "images", 5)
    with pytest.raises(AdaptationRefused, match="at least 20 frames"):
        adapt_bundle(pbc_only_bundle, frames, [str(i) for i in range(5)], tmp_path / "a")
    manifest = copy.deepcopy(load_bundle(pbc_only_bundle).manifest)
    del manifest["domain"]
    plain = tmp_path / "plain"
    bundle = load_bundle(pbc_only_bundle)
    save_bundle(plain, manifest, {name: bundle.path(name) for name in manifest["files"]})
    with pytest.raises(AdaptationRefused, match="no domain check"):
        adapt_bundle(plain, _frames(data_root / "bccd" / "images", 20), [str(i) for i in range(20)], tmp_path / "b")


def test_adapt_command_refuses_writing_over_its_bundle(pbc_only_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapt", "--bundle", str(pbc_only_bundle), "--frames", str(REPO / "samples"), "--out", str(pbc_only_bundle)]) == 2
    assert "another folder" in capsys.readouterr().err


def test_a_grey_frame_and_a_channel_swapped_one_are_left_out_of_the_fit(data_root: Path, tmp_path: Path) -> None:
    """One frame without colour or from elsewhere must not become a reference and widen the colour threshold: before
    they were left out, one grey frame among a device's fifty raised it twelvefold and the check refused nothing."""
    frames = _frames(data_root / "bccd" / "images", 22)
    grey = cv2.cvtColor(cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    swapped = np.ascontiguousarray(frames[1][..., ::-1])
    names = [f"bccd-{index}" for index in range(len(frames))]
    candidates = [f"odd-{index}" for index in range(50)]
    grey_name, swapped_name = np.array(candidates)[~held_back(candidates)][:2].tolist()  # both fitted, not held back
    assert held_back([*names, grey_name, swapped_name]).sum() > 0 and not held_back([*names, grey_name, swapped_name])[-2:].any()
    report = adapt_bundle(REPO / "models" / "default", [*frames, grey, swapped], [*names, grey_name, swapped_name], tmp_path / "adapted")
    assert report.written
    assert report.left_out == {NO_COLOUR: [grey_name], UNLIKE_THE_OTHERS: [swapped_name], OUTSIDE_FIELD: [], INCOMPLETE: []}
    assert any(grey_name in line and NO_COLOUR in line for line in report.lines())
    adapted = load_bundle(tmp_path / "adapted").manifest
    assert adapted["adaptation"]["left_out_of_the_fit"] == report.left_out
    detector = Detector.load(tmp_path / "adapted")
    for unjudgeable in (grey, swapped):
        assert detector.run(unjudgeable).verdict.status == "outside_domain"
    shipped = Detector.load(REPO / "models" / "default").domain_spec
    assert adapted["domain"]["max_colour_distance"] <= shipped["max_colour_distance"] * 1.25


def test_unfit_frames_names_colourless_far_and_black_bordered_frames_only() -> None:
    domain = {"colour_spread": [0.1, 0.1, 0.1], "max_colour_distance": 1.0}
    rng = np.random.default_rng(0)
    device = [FrameMeasure(np.array([0.5, 0.2, 0.1]) + rng.normal(0, 0.01, 3), 0.01, False, False, chroma=10.0) for _ in range(20)]
    far = FrameMeasure(np.array([-0.5, 0.9, -0.7]), 0.01, False, False, chroma=10.0)
    colourless = FrameMeasure(np.array([-0.4, -0.4, 0.7]), 0.01, False, False, chroma=1.0)
    unfit = unfit_frames(domain, [*device, far, colourless])
    assert np.flatnonzero(unfit[NO_COLOUR]).tolist() == [21]
    assert np.flatnonzero(unfit[UNLIKE_THE_OTHERS]).tolist() == [20]
    assert not unfit_frames(domain, device)[UNLIKE_THE_OTHERS].any()  # a device's own spread is no outlier
    circular = FrameMeasure(device[0].colour, 0.01, False, False, scores={"dark_share": 0.2})  # black outside its field of view
    assert np.flatnonzero(unfit_frames(domain, [*device, circular])[OUTSIDE_FIELD]).tolist() == [len(device)]
    torn = FrameMeasure(device[0].colour, 0.01, False, False, scores={"incomplete_rows": 0.3})  # a band of grey rows
    judged_circle = FrameMeasure(device[0].colour, 0.01, False, False, scores={"outside_field": 0.1})  # filled and judged
    unfit = unfit_frames(domain, [*device, torn, judged_circle])
    assert np.flatnonzero(unfit[INCOMPLETE]).tolist() == [len(device)] and not unfit[OUTSIDE_FIELD].any()
    domain.update(colour_references=[[0.0, 0.0, 0.0]] * 4, max_uncertainty=0.2)
    assert adapted_domain(domain, [*device, far, colourless]) == adapted_domain(domain, device)
    with pytest.raises(AdaptationRefused, match="stain colour"):
        adapted_domain(domain, [colourless, colourless])


def test_adapt_command_skips_files_it_cannot_use_and_reads_frames_as_it_goes(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from leukoedge.cli import DeviceFrames

    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted((data_root / "bccd" / "images").glob("*.jpg"))[:21]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    cv2.imwrite(str(folder / "tiny.png"), np.full((10, 10, 3), 128, np.uint8))
    frames = DeviceFrames(sorted(folder.iterdir()), load_bundle(REPO / "models" / "default").manifest["limits"])
    assert len(frames) == 21 and "empty.jpg" not in frames.names and "tiny.png" not in frames.names
    assert frames[0].shape[2] == 3 and frames[0] is not frames[0]  # read from its file each time, never all held
    assert main(["adapt", "--frames", str(folder), "--out", str(tmp_path / "adapted")]) == 0
    out = capsys.readouterr().out
    assert "2 of 23 file(s) skipped" in out and f"adapted bundle written to {tmp_path / 'adapted'}" in out
    adapted = load_bundle(tmp_path / "adapted")
    assert adapted.manifest["adaptation"]["frames"] == 21
    # Its results say which bundle gave them: not the shipped one, and which frames it was adapted to.
    shipped = load_bundle(REPO / "models" / "default").model_version
    assert adapted.model_version.startswith(f"{shipped}+adapted.") and adapted.model_version != shipped
    assert Detector.load(tmp_path / "adapted").run(frames[0]).model_version == adapted.model_version


def test_adapt_judges_frames_with_their_file_s_jpeg_quality_as_leukoedge_run_does(data_root: Path, tmp_path: Path) -> None:
    from leukoedge.cli import DeviceFrames

    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted((data_root / "bccd" / "images").glob("*.jpg"))[:21]:  # saved again under the bundle's file bar (75)
        cv2.imwrite(str(folder / path.name), cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 60])
    frames = DeviceFrames(sorted(folder.iterdir()), load_bundle(REPO / "models" / "default").manifest["limits"])
    assert frames.jpeg_qualities == [60] * 21
    as_files = adapt_bundle(REPO / "models" / "default", frames, frames.names, tmp_path / "a", jpeg_qualities=frames.jpeg_qualities)
    assert as_files.held_back > 0 and as_files.refused_before == as_files.held_back == as_files.refused_after  # as `leukoedge run` refuses them
    as_camera_frames = adapt_bundle(REPO / "models" / "default", frames, frames.names, tmp_path / "b")  # no file: no file bar
    assert as_camera_frames.refused_before < as_camera_frames.held_back
    with pytest.raises(ValueError, match="JPEG qualities"):
        adapt_bundle(REPO / "models" / "default", frames, frames.names, tmp_path / "c", jpeg_qualities=[60])


def test_frames_still_refused_after_adaptation_give_no_bundle_and_the_checks_that_refuse_them(tmp_path: Path) -> None:
    # Frames of random noise: adapting their colours in would refuse them no less (the noise check), so no bundle
    # adapted to them is written, and the report names what refuses them.
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(DEVICE_FRAMES)]
    names = [f"noise-{index:02d}.png" for index in range(DEVICE_FRAMES)]
    report = adapt_bundle(REPO / "models" / "default", frames, names, tmp_path / "adapted")
    assert report.held_back > 0 and report.refused_after == report.held_back and report.all_refused_after
    assert not report.written and not (tmp_path / "adapted").exists()
    assert report.refusing_after.get("noise") == report.held_back
    verdict_line = report.lines()[-1]
    assert verdict_line.startswith("bundle NOT written: every held-back frame is still refused after adaptation (by check: ") and f"noise {report.held_back}" in verdict_line


def test_an_adapted_version_names_the_original_and_its_frames_whatever_their_order() -> None:
    from leukoedge.adapt import adapted_version

    once = adapted_version("0.10.1", ["b" * 64, "a" * 64])
    assert once.startswith("0.10.1+adapted.") and once == adapted_version("0.10.1", ["a" * 64, "b" * 64])
    assert adapted_version(once, ["c" * 64]).startswith("0.10.1+adapted.") and adapted_version(once, ["c" * 64]) != once


def test_the_device_s_focus_bar_is_its_own_where_stricter_and_needs_enough_frames() -> None:
    def measured(values, score="edge_width") -> list[FrameMeasure]:
        return [FrameMeasure(np.zeros(3), 0.01, False, False, scores={score: v}) for v in values]

    sharp = np.linspace(1.0, 1.4, 40)
    assert device_threshold(3.3, measured(sharp), "max_edge_width") == pytest.approx(np.quantile(sharp, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    assert device_threshold(3.3, measured(np.linspace(2.5, 3.2, 40)), "max_edge_width") == 3.3  # a softer device: never loosened
    assert device_threshold(3.3, measured(sharp[: MIN_DEVICE_BAR_FRAMES - 1]), "max_edge_width") == 3.3  # too few frames to say
    assert device_threshold(3.3, [FrameMeasure(np.zeros(3), 0.01, False, False)] * 40, "max_edge_width") == 3.3  # no white cells
    assert device_threshold(3.3, measured(sharp, "noise"), "max_edge_width") == 3.3  # it reads the edge widths only


def test_the_device_s_motion_bar_is_raised_to_its_own_never_lowered_and_the_runtime_reads_it() -> None:
    from leukoedge.adapt import adapted_domain
    from leukoedge.domain import MIN_EDGE_ISOTROPY, failed_checks, motion_bar

    def measured(values) -> list[FrameMeasure]:
        return [FrameMeasure(np.full(3, 0.5), 0.01, False, False, scores={"edge_isotropy": v}) for v in values]

    crisp = np.linspace(0.6, 0.95, 40)  # a device whose sharp frames' edges run every way
    own = np.quantile(crisp, 1.0 - THRESHOLD_QUANTILE) / THRESHOLD_MARGIN
    assert device_threshold(MIN_EDGE_ISOTROPY, measured(crisp), "min_edge_isotropy") == pytest.approx(own)
    assert device_threshold(MIN_EDGE_ISOTROPY, measured(np.linspace(0.1, 0.3, 40)), "min_edge_isotropy") == MIN_EDGE_ISOTROPY
    assert device_threshold(MIN_EDGE_ISOTROPY, measured(crisp[: MIN_DEVICE_BAR_FRAMES - 1]), "min_edge_isotropy") == MIN_EDGE_ISOTROPY
    domain = Detector.load(REPO / "models" / "default").domain_spec
    adapted = adapted_domain(domain, measured(crisp))
    assert adapted["min_edge_isotropy"] == pytest.approx(own) and motion_bar(adapted) == pytest.approx(own)
    assert "min_edge_isotropy" not in adapted_domain(domain, measured(np.linspace(0.1, 0.3, 40)))  # never loosened
    inside = {"colour_distance": 0.0, "uncertainty": 0.01, "edge_isotropy": (own + MIN_EDGE_ISOTROPY) / 2}
    assert failed_checks(domain, inside) == [] and failed_checks(adapted, inside) == ["motion"]


def test_adapting_tightens_focus_to_the_device_and_counts_frames_beyond_it_apart(data_root: Path, tmp_path: Path) -> None:
    """The device's frames set a stricter focus threshold; a held-back frame blurrier than the device's usual is refused
    by the adapted bundle and counted apart, not as the adaptation doing worse (the bundle is still written)."""
    shipped = Detector.load(REPO / "models" / "default")
    frames = _frames(data_root / "bccd" / "images", 44)
    names = [f"bccd-{index}" for index in range(len(frames))]
    first = adapt_bundle(REPO / "models" / "default", frames, names, tmp_path / "first")
    bundle_bar, device_bar = first.own_bars["max_edge_width"]
    assert first.written and "max_edge_width" in first.tightened and device_bar < bundle_bar
    assert "domain.max_edge_width" in load_bundle(tmp_path / "first").manifest["adaptation"]["adapted"]

    def between_the_bars(index: int) -> np.ndarray | None:
        """The frame blurred beyond the device's bar but within the bundle's, if some blur does that."""
        side = median_cell_side([cell.box for cell in shipped.run(frames[index]).cells])
        for share in (0.02, 0.025, 0.03, 0.035, 0.04, 0.05):
            width = shipped.run(blurred := cv2.GaussianBlur(frames[index], (0, 0), share * side)).verdict.domain.get("edge_width", 0.0)
            if device_bar < width <= bundle_bar:
                return blurred
        return None

    held, blurred = next((index, frame) for index in np.flatnonzero(held_back(names)) if (frame := between_the_bars(index)) is not None)
    frames[held] = blurred
    report = adapt_bundle(REPO / "models" / "default", frames, names, tmp_path / "adapted")
    assert report.written and report.beyond_own_bars_after >= 1 and report.refused_after <= report.refused_before
    assert any("beyond only the device's own focus" in line for line in report.lines())
    assert shipped.run(blurred).verdict.status == "ok"
    assert "out of focus" in Detector.load(tmp_path / "adapted").run(blurred).verdict.reason


def test_adapt_refuses_a_device_whose_frames_all_come_with_red_and_blue_swapped(pbc_only_bundle: Path, data_root: Path, tmp_path: Path) -> None:
    """Adapted in, a device's swapped colours would become its references, and the flag's channel-order check would no
    longer see them: the frames are refused as a set, and read in the other order they adapt."""
    frames = [np.ascontiguousarray(frame[..., ::-1]) for frame in _frames(data_root / "bccd" / "images", DEVICE_FRAMES)]
    names = [f"bccd-{index}" for index in range(len(frames))]
    with pytest.raises(AdaptationRefused, match="red and blue swapped.*--channel-order RGB"):
        adapt_bundle(pbc_only_bundle, frames, names, tmp_path / "swapped")
    assert not (tmp_path / "swapped").exists()
    assert adapt_bundle(pbc_only_bundle, frames, names, tmp_path / "as-rgb", channel_order="RGB").written


def test_a_frame_is_measured_as_captured_so_one_mostly_outside_its_field_of_view_is_left_out() -> None:
    """measure() runs the detector on the frame as captured (which corrects it itself): a circular field cut at 0.7 of
    the half-diagonal is a quarter outside its field of view, refused, and left out of the colour fit."""
    from leukoedge.adapt import measure
    from leukoedge.domain import MAX_OUTSIDE_FIELD

    detector = Detector.load(REPO / "models" / "default")
    frame = cv2.imread(str(REPO / "samples" / "bccd_BloodImage_00002.jpg"))
    height, width = frame.shape[:2]
    inside = np.zeros((height, width), np.uint8)
    cv2.circle(inside, (width // 2, height // 2), int(0.7 * np.hypot(width, height) / 2), 255, -1)
    circular = measure(detector, np.where(inside[..., None] > 0, frame, 0).astype(np.uint8))
    assert circular.scores["outside_field"] > MAX_OUTSIDE_FIELD and circular.refused
    domain = {"colour_spread": [0.1, 0.1, 0.1], "max_colour_distance": 1.0}
    captured = measure(detector, frame)
    assert captured.scores["outside_field"] == 0.0 and not captured.refused
    assert unfit_frames(domain, [captured] * 20 + [circular])[OUTSIDE_FIELD].tolist() == [False] * 20 + [True]


def test_the_device_s_uncertainty_bar_is_its_own_where_the_segmenter_is_sure_of_most_of_its_frames() -> None:
    domain = {"max_uncertainty": 0.08, "max_device_uncertainty": 0.12}
    usual = np.linspace(0.02, 0.07, 95)
    softer = np.concatenate([usual, np.full(5, 0.09)])  # 5 % beyond the bundle's bar
    assert device_uncertainty_bar(domain, softer) == pytest.approx(np.quantile(softer, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    assert device_uncertainty_bar(domain, np.concatenate([usual, np.full(5, 0.3)])) == 0.12  # at most the widest validated source's
    lost = np.concatenate([np.full(80, 0.05), np.full(20, 0.09)])  # the segmenter unsure of a fifth of the frames
    assert np.mean(lost > 0.08) > MAX_UNSURE_SHARE and device_uncertainty_bar(domain, lost) == 0.08
    assert device_uncertainty_bar(domain, np.linspace(0.02, 0.05, 100)) == 0.08  # a surer device: never narrowed
    assert device_uncertainty_bar({"max_uncertainty": 0.08}, softer) == 0.08  # a bundle fitted before the widest bar was kept
    frames = [FrameMeasure(np.full(3, 0.5), value, False, False) for value in softer]
    assert adapted_domain({**domain, "colour_references": [[0.5] * 3] * 4, "colour_spread": [0.1] * 3, "max_colour_distance": 1.0}, frames)[
        "max_uncertainty"
    ] == pytest.approx(device_uncertainty_bar(domain, softer))


def test_the_widest_source_bar_is_the_least_sure_source_s_own_fit() -> None:
    rng = np.random.default_rng(0)
    sure, soft = rng.uniform(0.01, 0.04, 40), rng.uniform(0.03, 0.09, 40)
    spec = fit_domain(rng.normal(0, 1, (80, 3)), np.concatenate([sure, soft]), ["a"] * 40 + ["b"] * 40)
    assert spec["max_device_uncertainty"] == pytest.approx(np.quantile(soft, THRESHOLD_QUANTILE) * THRESHOLD_MARGIN)
    assert spec["max_device_uncertainty"] >= spec["max_uncertainty"]


def test_adapting_reports_and_records_the_uncertainty_bar_it_gives_the_device(data_root: Path, tmp_path: Path) -> None:
    """A bundle whose uncertainty bar lies within the device's spread: where a few frames are beyond it the bar becomes
    the device's own (recorded and printed); where many are, it is kept and the report says labels are needed."""
    shipped = Detector.load(REPO / "models" / "default")
    frames = _frames(data_root / "bccd" / "images", 30)
    names = [f"bccd-{index}" for index in range(len(frames))]
    fitting = [shipped.run(frame).verdict.domain["uncertainty"] for frame, held in zip(frames, held_back(names)) if not held]

    def bundle_with_bar(quantile: float) -> Path:
        manifest = copy.deepcopy(shipped.bundle.manifest)
        manifest["domain"].update(max_uncertainty=float(np.quantile(fitting, quantile)), max_device_uncertainty=0.5)
        out = tmp_path / f"bar-{quantile}"
        save_bundle(out, manifest, {name: shipped.bundle.path(name) for name in manifest["files"]})
        return out

    report = adapt_bundle(bundle_with_bar(0.95), frames, names, tmp_path / "own")
    assert report.written and report.uncertainty_bar[1] > report.uncertainty_bar[0] and report.unsure_share <= MAX_UNSURE_SHARE
    assert any(line.startswith("uncertainty threshold:") for line in report.lines())
    assert "domain.max_uncertainty" in load_bundle(tmp_path / "own").manifest["adaptation"]["adapted"]
    kept = adapt_bundle(bundle_with_bar(0.5), frames, names, tmp_path / "kept")
    assert kept.uncertainty_bar[1] == kept.uncertainty_bar[0] and kept.unsure_share > MAX_UNSURE_SHARE
    assert any(line.startswith("uncertainty threshold kept") and "--labels" in line for line in kept.lines())
