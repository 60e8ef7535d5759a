"""The reference preprocessing: letterbox geometry, stain normalization, segmenter and crop inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge.preprocess.cpu import (
    DARK_LEVEL,
    DARK_STEP,
    STAGED_SHRINK_REST,
    EVEN_FROM,
    PreprocessSpec,
    StainReference,
    cut_reflected,
    even_illumination,
    dark_share,
    fit_letterbox,
    halvings,
    lab_statistics,
    mirrored_at_edges,
    prepare_crops,
    prepare_frame,
    region_source,
    reinhard_normalize,
    reinhard_with_statistics,
    resize,
    resize_labels,
    shows_half,
    shrink_frame,
    square_crop_box,
    to_rgb_float,
    touches_edge,
)

SEGMENTER_INPUT = (192, 256)
CROP_INPUT = (64, 64)
# A reference unlike every source's own colours, so that normalization has work to do.
REFERENCE = StainReference(lab_mean=(65.0, 15.0, -12.0), lab_std=(14.0, 9.0, 7.0))
SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), REFERENCE)
SPEC_WITHOUT_STAIN = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)


def _bccd_frame(data_root: Path) -> np.ndarray:
    path = data_root / "bccd" / "images" / "BloodImage_00000.jpg"
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert frame is not None, f"cannot read {path}"
    return frame


def _noise_frame(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_640x480_field_fills_the_segmenter_input_exactly():
    placement = fit_letterbox(480, 640, SEGMENTER_INPUT)
    assert placement.scale == pytest.approx(0.4)
    assert (placement.pad_x, placement.pad_y) == (0, 0)
    assert (placement.content_width, placement.content_height) == (256, 192)
    assert (placement.frame_width, placement.frame_height) == (640, 480)


def test_a_square_crop_is_centred_with_horizontal_padding():
    placement = fit_letterbox(120, 120, SEGMENTER_INPUT)
    assert placement.scale == pytest.approx(1.6)
    assert (placement.content_width, placement.content_height) == (192, 192)
    assert (placement.pad_x, placement.pad_y) == (32, 0)


def test_a_tall_frame_is_padded_vertically():
    placement = fit_letterbox(400, 100, SEGMENTER_INPUT)
    assert placement.content_height == 192
    assert placement.pad_x == (256 - placement.content_width) // 2
    assert placement.pad_y == 0


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("frame_size", [(480, 640), (120, 120)], ids=["full-field", "letterboxed"])
def test_label_map_round_trips_through_the_model_resolution(frame_size):
    frame_height, frame_width = frame_size
    placement = fit_letterbox(frame_height, frame_width, SEGMENTER_INPUT)
    frame_labels = np.zeros(frame_size, np.uint8)
    frame_labels[: frame_height // 2, : frame_width // 2] = 1
    frame_labels[frame_height // 2 :, frame_width // 2 :] = 2
    model_labels = np.full(SEGMENTER_INPUT, 7, np.uint8)  # 7 marks padding: it must not come back
    content = resize_labels(frame_labels, placement.content_width, placement.content_height)
    model_labels[placement.pad_y : placement.pad_y + placement.content_height, placement.pad_x : placement.pad_x + placement.content_width] = content

    back = placement.label_map_to_frame(model_labels)

    assert back.shape == frame_size
    assert 7 not in back
    if placement.scale > 1:  # enlarged into the model: nothing is lost, so the way back is exact
        assert np.array_equal(back, frame_labels)
    else:  # only pixels next to a block edge may move
        assert np.mean(back == frame_labels) > 0.99


@pytest.mark.parametrize(("size", "resized"), [((120, 120), (192, 192)), ((192, 192), (120, 120)), ((480, 640), (192, 256))])
def test_resized_labels_stay_where_the_resized_image_is(size, resized):
    # A disk off the centre: its outline must land where resize() puts the same disk in an image,
    # or every mask of training and runtime sits a fraction of a pixel beside its cell.
    disk = _disk(size, (0.37 * size[0], 0.58 * size[1]), 0.2 * min(size))
    image = resize(disk.astype(np.float32), resized[1], resized[0])
    labels = resize_labels(disk, resized[1], resized[0])

    assert np.abs(_centroid(labels) - _centroid(image > 0.5)).max() < 0.1
    assert np.abs(_centroid(labels) - _centroid(image)).max() < 0.1 * size[0] / resized[0] + 0.1


@pytest.mark.parametrize(
    ("frame_size", "frame_box"),
    [((480, 640), (100, 50, 300, 250)), ((120, 120), (10, 20, 50, 60)), ((480, 640), (37, 11, 613, 479))],
    ids=["full-field", "letterboxed", "odd-coordinates"],
)
def test_box_round_trips_from_frame_to_model_and_back(frame_size, frame_box):
    placement = fit_letterbox(frame_size[0], frame_size[1], SEGMENTER_INPUT)
    x0, y0, x1, y1 = frame_box
    # The smallest model-pixel box covering the frame box, as a segmenter would report it.
    model_box = (
        int(np.floor(x0 * placement.scale + placement.pad_x)),
        int(np.floor(y0 * placement.scale + placement.pad_y)),
        int(np.ceil(x1 * placement.scale + placement.pad_x)),
        int(np.ceil(y1 * placement.scale + placement.pad_y)),
    )
    back = placement.box_to_frame(model_box)
    one_model_pixel = int(np.ceil(1 / placement.scale))
    # The mapped box covers the original and overshoots by less than one model pixel per side.
    assert back[0] <= x0 and back[1] <= y0 and back[2] >= x1 and back[3] >= y1
    assert x0 - back[0] <= one_model_pixel and y0 - back[1] <= one_model_pixel
    assert back[2] - x1 <= one_model_pixel and back[3] - y1 <= one_model_pixel


def test_box_to_frame_maps_exact_multiples_exactly_and_clips_padding_to_the_frame():
    placement = fit_letterbox(120, 120, SEGMENTER_INPUT)  # scale 1.6, pad_x 32
    assert placement.box_to_frame((32 + 16, 32, 32 + 80, 96)) == (10, 20, 50, 60)
    # A box reaching into the padding on both sides ends at the frame's edges.
    assert placement.box_to_frame((0, 0, 256, 192)) == (0, 0, 120, 120)


def test_reinhard_normalize_matches_the_reference_statistics_on_a_real_field(data_root):
    rgb = to_rgb_float(_bccd_frame(data_root))
    before_mean, _ = lab_statistics(rgb)
    assert np.abs(before_mean - REFERENCE.lab_mean).max() > 5.0  # the test would pass trivially otherwise

    mean, std = lab_statistics(reinhard_normalize(rgb, REFERENCE))

    # Only clipping to the RGB gamut moves the result off the reference: measured 0.1 L*a*b* units
    # on the mean and 0.2 % on the std for BCCD fields.
    np.testing.assert_allclose(mean, REFERENCE.lab_mean, atol=0.5)
    np.testing.assert_allclose(std, REFERENCE.lab_std, rtol=0.02)


def test_one_lab_conversion_gives_the_statistics_and_the_normalization_of_two(data_root):
    """reinhard_with_statistics reads the image's statistics from the conversion it transfers: bit for bit what
    lab_statistics and then reinhard_normalize with them give (prepare_frame's path before)."""
    rgb = to_rgb_float(_bccd_frame(data_root))
    normalized, (mean, std) = reinhard_with_statistics(rgb, REFERENCE)
    expected_mean, expected_std = lab_statistics(rgb)
    np.testing.assert_array_equal(mean, expected_mean)
    np.testing.assert_array_equal(std, expected_std)
    np.testing.assert_array_equal(normalized, reinhard_normalize(rgb, REFERENCE, (expected_mean, expected_std)))
    given = (expected_mean + 3.0, expected_std)
    returned = reinhard_with_statistics(rgb, REFERENCE, given)[1]
    assert returned[0] is given[0] and returned[1] is given[1]


def test_reinhard_normalize_uses_given_statistics_instead_of_its_own(data_root):
    rgb = to_rgb_float(_bccd_frame(data_root))
    crop = rgb[100:200, 100:200]
    whole_frame = lab_statistics(rgb)
    # Equal to the whole frame's normalization up to float rounding (vectorized vs. scalar loops).
    np.testing.assert_allclose(reinhard_normalize(crop, REFERENCE, whole_frame), reinhard_normalize(rgb, REFERENCE)[100:200, 100:200], atol=1e-6)
    assert np.abs(reinhard_normalize(crop, REFERENCE) - reinhard_normalize(crop, REFERENCE, whole_frame)).max() > 0.01


def test_prepare_frame_gives_the_segmenter_input_shape_and_dtype(data_root):
    prepared = prepare_frame(_bccd_frame(data_root), SPEC, SEGMENTER_INPUT)
    assert prepared.tensor.shape == (1, 3, *SEGMENTER_INPUT)
    assert prepared.tensor.dtype == np.float32
    assert prepared.tensor.flags.c_contiguous
    assert np.isfinite(prepared.tensor).all()
    assert prepared.letterbox == fit_letterbox(480, 640, SEGMENTER_INPUT)
    assert prepared.lab_statistics is not None
    assert prepare_frame(_bccd_frame(data_root), SPEC_WITHOUT_STAIN, SEGMENTER_INPUT).lab_statistics is None


@pytest.mark.parametrize("spec", [SPEC, SPEC_WITHOUT_STAIN], ids=["stain", "no-stain"])
def test_letterbox_padding_is_the_mean_colour_which_normalizes_to_zero(spec):
    prepared = prepare_frame(_noise_frame(120, 120), spec, SEGMENTER_INPUT)
    tensor = prepared.tensor[0]
    pad_x = prepared.letterbox.pad_x
    assert pad_x == 32
    assert np.all(tensor[:, :, :pad_x] == 0.0)
    assert np.all(tensor[:, :, pad_x + 192 :] == 0.0)
    assert np.abs(tensor[:, :, pad_x : pad_x + 192]).mean() > 0.1


def test_prepare_frame_reads_bgr_and_rgb_frames_alike(data_root):
    frame = _bccd_frame(data_root)
    from_bgr = prepare_frame(frame, SPEC, SEGMENTER_INPUT, channel_order="BGR")
    from_rgb = prepare_frame(np.ascontiguousarray(frame[..., ::-1]), SPEC, SEGMENTER_INPUT, channel_order="RGB")
    np.testing.assert_array_equal(from_bgr.tensor, from_rgb.tensor)


def test_model_channel_order_reverses_the_input_channels(data_root):
    frame = _bccd_frame(data_root)
    bgr_spec = PreprocessSpec("BGR", SPEC.mean, SPEC.std, SPEC.stain_reference)
    rgb_model = prepare_frame(frame, SPEC, SEGMENTER_INPUT).tensor
    bgr_model = prepare_frame(frame, bgr_spec, SEGMENTER_INPUT).tensor
    np.testing.assert_array_equal(bgr_model, rgb_model[:, ::-1])


def test_square_crop_box_is_a_centred_square_grown_by_the_margin():
    assert square_crop_box((10, 20, 30, 60), 0.0) == (0, 20, 40, 60)
    assert square_crop_box((10, 20, 30, 60), 0.25) == (-10, 10, 50, 70)
    x0, y0, x1, y1 = square_crop_box((100, 100, 140, 130), 0.15)
    assert x1 - x0 == y1 - y0 == 52  # the long side 40, grown by 15 % on each edge
    assert (x0 + x1) / 2 == pytest.approx(120, abs=0.5) and (y0 + y1) / 2 == pytest.approx(115, abs=0.5)


def test_square_crop_box_of_a_point_is_at_least_two_pixels():
    x0, y0, x1, y1 = square_crop_box((5, 5, 5, 5), 0.15)
    assert x1 - x0 >= 2 and y1 - y0 >= 2


@pytest.mark.parametrize("spec", [SPEC, SPEC_WITHOUT_STAIN], ids=["stain", "no-stain"])
def test_crop_at_the_frame_edge_is_mean_colour_outside_the_frame(spec):
    frame = _noise_frame(200, 300)
    box = (0, 0, 40, 40)  # a cell touching the top-left corner
    crop_box = square_crop_box(box, 0.5)  # (-20, -20, 60, 60): a quarter of each side lies outside
    assert crop_box == (-20, -20, 60, 60)
    statistics = lab_statistics(to_rgb_float(frame)) if spec.stain_reference is not None else None

    crop = prepare_crops(frame, [box], spec, CROP_INPUT, 0.5, statistics)

    assert crop.shape == (1, 3, *CROP_INPUT) and crop.dtype == np.float32
    outside = 64 * 20 // 80  # 16 of 64 rows and columns come from outside the frame
    # One row/column of slack: resizing blurs the inside/outside border by a pixel.
    assert np.all(crop[0, :, : outside - 1, :] == 0.0)
    assert np.all(crop[0, :, :, : outside - 1] == 0.0)
    assert np.abs(crop[0, :, outside + 1 :, outside + 1 :]).mean() > 0.1


def test_a_box_at_the_frame_edge_is_mirrored_across_each_edge_it_touches():
    shape = (100, 200)  # height, width
    assert not touches_edge((10, 10, 50, 50), shape)
    assert mirrored_at_edges((10, 10, 50, 50), shape) == (10, 10, 50, 50)
    assert touches_edge((150, 20, 200, 60), shape)
    assert mirrored_at_edges((150, 20, 200, 60), shape) == (150, 20, 250, 60)  # the right edge: x 200 is the mirror axis
    assert mirrored_at_edges((0, 0, 30, 40), shape) == (-30, -40, 30, 40)  # the top-left corner, both edges
    assert mirrored_at_edges((0, 70, 200, 100), shape) == (-200, 70, 400, 130)  # a box as wide as the frame, at its bottom


def test_a_box_shows_half_a_cell_when_it_reaches_in_half_its_length_along_each_edge_it_touches():
    shape = (100, 200)
    assert shows_half((10, 10, 50, 50), shape)  # inside the frame: whole
    assert shows_half((180, 30, 200, 70), shape)  # 20 deep at the right edge, 40 along it: a disc cut through its centre
    assert not shows_half((181, 30, 200, 70), shape)  # 19 deep: less than half
    assert not shows_half((0, 10, 9, 40), shape)  # a sliver at the left edge
    assert shows_half((0, 0, 30, 20), shape) and not shows_half((0, 0, 30, 14), shape)  # a corner: both edges count


def test_the_reflected_cut_repeats_the_edge_pixel_then_goes_inward():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cut = cut_reflected(image, (-2, 0, 6, 3))
    assert cut.tolist() == [[1, 0, 0, 1, 2, 3, 3, 2], [5, 4, 4, 5, 6, 7, 7, 6], [9, 8, 8, 9, 10, 11, 11, 10]]
    assert np.array_equal(cut_reflected(image, (1, 0, 3, 2)), image[0:2, 1:3])  # inside: the pixels themselves
    rgb = _noise_frame(20, 30)
    assert np.array_equal(cut_reflected(rgb, (-5, -3, 30, 20)), cv2.copyMakeBorder(rgb, 3, 0, 5, 0, cv2.BORDER_REFLECT))


def test_a_cell_cut_by_the_edge_reflected_and_mirrored_is_the_whole_cell():
    """A frame that ends in the middle of a mirror-symmetric cell: the half's crop, mirrored and reflected, is the
    crop of the whole cell in the frame that goes on."""
    half = np.full((120, 101, 3), 220, np.uint8)
    cv2.circle(half, (100, 60), 20, (150, 60, 120), -1)
    cv2.circle(half, (96, 58), 9, (120, 20, 90), -1)
    whole = np.concatenate([half, half[:, ::-1]], axis=1)  # symmetric about the line between columns 100 and 101
    box = (80, 40, 101, 81)  # the cell's half in the cut frame, touching its right edge
    statistics = lab_statistics(to_rgb_float(whole))
    mirrored = mirrored_at_edges(box, half.shape[:2])
    assert mirrored == (80, 40, 122, 81)
    from_half = prepare_crops(half, [mirrored], SPEC, CROP_INPUT, 0.15, statistics, outside="reflect")
    from_whole = prepare_crops(whole, [mirrored], SPEC, CROP_INPUT, 0.15, statistics)
    np.testing.assert_array_equal(from_half, from_whole)
    filled = prepare_crops(half, [box], SPEC, CROP_INPUT, 0.15, statistics)  # as the gate reads it first: mean colour beyond the edge
    assert np.abs(filled - from_whole).mean() > 0.1
    with pytest.raises(ValueError, match="outside"):
        prepare_crops(half, [box], SPEC, CROP_INPUT, 0.15, statistics, outside="wrap")


def test_crops_batch_one_input_per_box_in_order(data_root):
    frame = _bccd_frame(data_root)
    statistics = lab_statistics(to_rgb_float(frame))
    boxes = [(100, 100, 160, 150), (300, 200, 340, 260)]
    batch = prepare_crops(frame, boxes, SPEC, CROP_INPUT, 0.15, statistics)
    assert batch.shape == (2, 3, *CROP_INPUT)
    for index, box in enumerate(boxes):
        np.testing.assert_array_equal(batch[index], prepare_crops(frame, [box], SPEC, CROP_INPUT, 0.15, statistics)[0])
    assert not np.array_equal(batch[0], batch[1])


def _smear(height: int = 360, width: int = 480, seed: int = 0) -> np.ndarray:
    """A pale background with red cells and one large white cell at the centre, evenly lit."""
    rng = np.random.default_rng(seed)
    frame = np.full((height, width, 3), (215, 200, 225), np.uint8)
    for _ in range(40):
        cv2.circle(frame, (int(rng.integers(0, width)), int(rng.integers(0, height))), 18, (170, 140, 205), -1)
    cv2.circle(frame, (width // 2, height // 2), 70, (190, 150, 170), -1)  # a large white cell filling the centre tiles
    cv2.circle(frame, (width // 2, height // 2), 45, (140, 60, 90), -1)
    return np.clip(frame + rng.normal(0.0, 2.0, frame.shape), 0, 255).astype(np.uint8)


def test_an_evenly_lit_frame_is_left_as_it_is_even_with_a_large_dark_cell_at_its_centre():
    frame = _smear()
    evened, falloff = even_illumination(frame)
    assert evened is frame and falloff < 0.05


@pytest.mark.parametrize("darkest", [0.5, 0.7])
def test_light_falling_off_across_the_frame_is_measured_and_divided_out(darkest: float):
    frame = _smear()
    gain = np.linspace(darkest, 1.0, frame.shape[1], dtype=np.float32)[None, :, None]
    dimmed = (frame * gain).astype(np.uint8)
    evened, falloff = even_illumination(dimmed)
    assert falloff == pytest.approx(1.0 - darkest, abs=0.05)
    assert falloff >= EVEN_FROM
    # the background is as bright at the dark side as at the lit side again, and as the frame before dimming
    left, right = evened[:, :40].reshape(-1, 3), evened[:, -40:].reshape(-1, 3)
    assert abs(np.percentile(left, 90) - np.percentile(right, 90)) < 12  # 50-110 grey levels apart before
    assert np.abs(evened.astype(int) - frame).mean() < 6
    # evening twice is evening once: an evened frame is left as it is
    again, falloff_again = even_illumination(evened)
    assert again is evened and falloff_again < EVEN_FROM


def test_a_rim_darker_than_the_centre_is_a_falloff_too():
    frame = _smear()
    height, width = frame.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot((x - width / 2) / (width / 2), (y - height / 2) / (height / 2))
    dimmed = (frame * (1.0 - 0.25 * radius**2)[..., None]).astype(np.uint8)  # the corners at half the centre's light
    evened, falloff = even_illumination(dimmed)
    assert EVEN_FROM < falloff < 0.6  # a plane and a bowl in log brightness approximate this rim's falloff
    assert np.abs(evened.astype(int) - frame).mean() < 8


SAMPLE_FIELD = Path(__file__).resolve().parents[2] / "samples" / "bccd_BloodImage_00002.jpg"


@pytest.mark.parametrize("size", [(640, 480), (1024, 768), (575, 575)])
def test_a_frame_shrunk_by_four_or_less_is_the_one_step_resize(size):
    # Every source's frames shrink by 3 at most: what the models learnt from must not move.
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), size, interpolation=cv2.INTER_LINEAR)
    placement = fit_letterbox(size[1], size[0], SEGMENTER_INPUT)
    width, height = placement.content_width, placement.content_height
    assert np.array_equal(shrink_frame(frame, width, height), resize(frame, width, height))


@pytest.mark.parametrize("size", [(1280, 960), (1920, 1080), (2448, 2048), (2560, 1920), (2592, 1944), (3264, 2448), (4056, 3040)])
def test_a_camera_sized_frame_halved_first_stays_within_a_few_grey_levels_of_the_one_step_resize(size):
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), size, interpolation=cv2.INTER_LINEAR)
    placement = fit_letterbox(size[1], size[0], SEGMENTER_INPUT)
    width, height = placement.content_width, placement.content_height
    staged, one_step = shrink_frame(frame, width, height).astype(int), resize(frame, width, height).astype(int)
    assert staged.shape == one_step.shape
    difference = np.abs(staged - one_step)
    assert difference.max() <= 2 and np.percentile(difference, 99) <= 1 and difference.mean() <= 0.3  # each halving rounds to whole levels
    halved = halvings(frame, width, height)[-1]
    assert 2 < min(halved.shape[1] / width, halved.shape[0] / height) <= STAGED_SHRINK_REST  # halved till 2-4 remain


def test_halving_stops_at_an_odd_side_and_the_rest_is_shrunk_in_one_step():
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), (2594, 1946), interpolation=cv2.INTER_LINEAR)
    assert [level.shape[:2] for level in halvings(frame, 256, 192)] == [(973, 1297)]  # 5.07 left, but 1297 is odd
    staged, one_step = shrink_frame(frame, 256, 192).astype(int), resize(frame, 256, 192).astype(int)
    assert np.abs(staged - one_step).max() <= 2


def test_a_frame_with_an_odd_side_is_shrunk_in_one_step():
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), (2591, 1944), interpolation=cv2.INTER_LINEAR)
    assert halvings(frame, 256, 192) == []
    assert np.array_equal(shrink_frame(frame, 256, 192), resize(frame, 256, 192))


def test_frames_of_random_sizes_shrink_within_a_few_grey_levels_of_the_one_step_resize():
    sample = cv2.imread(str(SAMPLE_FIELD))
    rng = np.random.default_rng(1)
    for width, height in rng.integers(16, 4097, size=(40, 2)).tolist():
        frame = cv2.resize(sample, (width, height), interpolation=cv2.INTER_LINEAR)
        placement = fit_letterbox(height, width, SEGMENTER_INPUT)
        size = placement.content_width, placement.content_height
        assert np.abs(shrink_frame(frame, *size).astype(int) - resize(frame, *size).astype(int)).max() <= 6, (width, height)


def test_dark_share_is_the_share_of_sampled_pixels_whose_brightest_channel_is_under_the_dark_level():
    rng = np.random.default_rng(3)
    for height, width in ((480, 640), (243, 517), (1944, 2592)):
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        frame[: height // 3] //= 8  # a dark band: its pixels' brightest channel under 32, many under DARK_LEVEL
        for view in (frame, frame[1:, 3:]):  # a view that does not start at the buffer's start
            sampled = view[::DARK_STEP, ::DARK_STEP]
            assert dark_share(view) == pytest.approx(float((sampled.max(axis=2) < DARK_LEVEL).mean()), abs=1e-12)


def test_a_large_cell_of_a_camera_sized_frame_is_cut_from_its_halvings_and_a_small_one_from_the_frame():
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), (2592, 1944), interpolation=cv2.INTER_LINEAR)
    halved = halvings(frame, 256, 192)
    assert [level.shape[1] for level in halved] == [1296, 648]
    small = (1000, 800, 1200, 1000)  # 200 px into 64: 3.1, the frame itself
    assert region_source(frame, halved, small, 64, 64) == (frame, small)
    assert region_source(frame, [], (0, 0, 1000, 1000), 64, 64)[0] is frame  # a frame not halved: always itself
    for box, level in (((800, 600, 1200, 1000), 1), ((700, 500, 1300, 1100), 2), ((0, 0, 1800, 1800), 2)):
        image, (x0, y0, x1, y1) = region_source(frame, halved, box, 64, 64)
        rest = (x1 - x0) / 64
        assert image is halved[level - 1] and 2 < rest and (rest <= STAGED_SHRINK_REST or level == len(halved))  # as far as they go
        cut, whole = resize(image[y0:y1, x0:x1], 64, 64).astype(int), resize(frame[box[1] : box[3], box[0] : box[2]], 64, 64).astype(int)
        assert np.abs(cut - whole).max() <= 6 and np.abs(cut - whole).mean() <= 0.5, box


def test_crops_of_a_camera_sized_frame_s_large_cells_cut_from_its_halvings_match_the_full_resolution_ones():
    frame = cv2.resize(cv2.imread(str(SAMPLE_FIELD)), (2592, 1944), interpolation=cv2.INTER_LINEAR)
    spec = PreprocessSpec(channel_order="RGB", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), stain_reference=None)
    boxes = [(1301, 3, 2101, 723), (-101, 1501, 401, 2001), (1000, 800, 1150, 950)]  # a large cell, one past the edge, a small one
    halved = tuple(halvings(frame, 256, 192))
    cut = prepare_crops(frame, boxes, spec, (64, 64), 0.15, None, halved=halved)
    whole = prepare_crops(frame, boxes, spec, (64, 64), 0.15, None)
    grey_levels = np.abs(cut - whole) * 0.25 * 255  # back to grey levels
    assert grey_levels[0].max() <= 6 and grey_levels[:2].mean() <= 0.5
    # Past the frame's edge, where the crop's padding begins moves by under a fifth of an output pixel (the square's
    # corners rounded to the halving's pixels): up to the step from the padding's mean colour to the frame's pixels.
    assert np.percentile(grey_levels[1], 99) <= 12
    assert np.array_equal(cut[2], whole[2])  # 150 px + margin into 64: cut from the frame itself


def test_a_region_cut_from_a_halving_stays_square_and_inside_the_frame():
    frame = np.zeros((1944, 2592, 3), np.uint8)
    halved = halvings(frame, 256, 192)
    rng = np.random.default_rng(2)
    for _ in range(500):
        side = int(rng.integers(300, 1500))
        x0, y0 = int(rng.integers(-200, 2592 - side + 200)), int(rng.integers(-200, 1944 - side + 200))
        image, (left, top, right, bottom) = region_source(frame, halved, (x0, y0, x0 + side, y0 + side), 64, 64)
        assert right - left == bottom - top, (x0, y0, side)
        if 0 <= x0 and x0 + side <= 2592:
            assert 0 <= left and right <= image.shape[1], (x0, side)
        if 0 <= y0 and y0 + side <= 1944:
            assert 0 <= top and bottom <= image.shape[0], (y0, side)


@pytest.mark.parametrize("channel_order", ["BGR", "RGB"])
def test_to_rgb_float_is_the_pixels_over_255_in_rgb_order_and_a_copy(channel_order: str) -> None:
    frame = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for image in (frame, frame[5:30, 7:41]):  # a whole frame and a view of part of it (rows not contiguous)
        rgb = to_rgb_float(image, channel_order)
        expected = (image[..., ::-1] if channel_order == "BGR" else image).astype(np.float32) * np.float32(1.0 / 255.0)
        assert rgb.dtype == np.float32 and rgb.flags.c_contiguous
        assert np.array_equal(rgb, expected)
        assert not np.shares_memory(rgb, image)
