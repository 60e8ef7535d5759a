"""Training samples: the labels must stay on the pixels they describe through every augmentation."""

import numpy as np
import pytest

from leukoedge.preprocess.cpu import PreprocessSpec, StainReference, lab_statistics, prepare_crops, to_rgb_float
from leukoedge.training.data import LABEL_BACKGROUND, LABEL_NUCLEUS
from leukoedge.training.samples import BOX_JITTER, CAPTURE_NOISE, capture_degraded, classification_sample, device_view, jitter_box, refiner_sample, resolution_lowered, segmentation_sample
from leukoedge.training.stain import turn_chroma

SPEC = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), StainReference(lab_mean=(70.0, 5.0, 2.0), lab_std=(14.0, 12.0, 15.0)))


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("frame_size", [(120, 120), (103, 103), (480, 640)], ids=["zheng", "all-idb2", "field"])
def test_augmented_labels_stay_on_their_pixels(frame_size):
    # A dark purple disk (a nucleus) off the centre of a pale frame; its label must follow it through
    # rescaling, flips and placement to within a fraction of a model pixel.
    ys, xs = np.mgrid[: frame_size[0], : frame_size[1]]
    disk = (ys - 0.41 * frame_size[0]) ** 2 + (xs - 0.57 * frame_size[1]) ** 2 <= (0.2 * min(frame_size)) ** 2
    image = np.full((*frame_size, 3), (225, 215, 230), np.uint8)
    image[disk] = (150, 40, 90)
    labels = np.where(disk, LABEL_NUCLEUS, LABEL_BACKGROUND).astype(np.uint8)
    rng = np.random.default_rng(3)
    for _ in range(6):
        tensor, sample_labels = segmentation_sample(image, labels, SPEC, (192, 256), rng)
        nucleus = sample_labels == LABEL_NUCLEUS
        if nucleus.sum() < 50 or nucleus[:4].any() or nucleus[-4:].any() or nucleus[:, :4].any() or nucleus[:, -4:].any():
            continue  # placed partly off the canvas: centroids are not comparable
        green = tensor[1]  # the nucleus is dark in green whatever the colour jitter
        inside, outside = np.median(green[nucleus]), np.median(green[sample_labels == LABEL_BACKGROUND])
        ys, xs = np.nonzero(nucleus)
        near = np.zeros_like(nucleus)  # the padding is neither: look only around the disk
        near[ys.min() - 3 : ys.max() + 4, xs.min() - 3 : xs.max() + 4] = True
        dark = (green < (inside + outside) / 2) & near
        assert np.abs(_centroid(nucleus) - _centroid(dark)).max() < 0.25


@pytest.mark.parametrize("augment", [False, True], ids=["runtime", "augmented"])
def test_refiner_crops_and_their_labels_cover_the_same_pixels(augment):
    # A dark disk (a nucleus) in a pale field: in the refiner's crop, its label must sit on the dark pixels,
    # with the box jittered, rotated and flipped; without augmentation the crop is the runtime's crop.
    ys, xs = np.mgrid[:200, :260]
    disk = (ys - 90) ** 2 + (xs - 140) ** 2 <= 30**2
    image = np.full((200, 260, 3), (225, 215, 230), np.uint8)
    image[disk] = (150, 40, 90)
    labels = np.where(disk, LABEL_NUCLEUS, LABEL_BACKGROUND).astype(np.uint8)
    box = (110, 60, 171, 121)
    rng = np.random.default_rng(5) if augment else None
    for _ in range(4 if augment else 1):
        crop, crop_labels = refiner_sample(image, labels, box, SPEC, (128, 128), 0.15, rng)
        assert crop.shape == (3, 128, 128) and crop_labels.shape == (128, 128)
        nucleus = crop_labels == LABEL_NUCLEUS
        dark = crop[1] < (np.median(crop[1][nucleus]) + np.median(crop[1][~nucleus])) / 2
        assert (nucleus == dark).mean() > 0.99
    if not augment:
        runtime = prepare_crops(image, [box], SPEC, (128, 128), 0.15, lab_statistics(to_rgb_float(image)))[0]
        assert np.array_equal(crop, runtime)


def _cell_field() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A pale field with a dark purple disk (a nucleus) and its box."""
    ys, xs = np.mgrid[:240, :320]
    image = np.full((240, 320, 3), (225, 215, 230), np.uint8)
    image[(ys - 110) ** 2 + (xs - 170) ** 2 <= 28**2] = (150, 40, 90)
    return image, (142, 82, 199, 139)


def test_another_microscopes_view_keeps_the_cell_in_its_box() -> None:
    # device_view augments a window around the cell and rescales it: the box must follow the cell.
    image, box = _cell_field()
    for seed in range(6):
        window, moved, (lab_mean, lab_std) = device_view(image, box, 0.15, np.random.default_rng(seed), 1.0)
        x0, y0, x1, y1 = moved
        assert 0 <= x0 < x1 <= window.shape[1] and 0 <= y0 < y1 <= window.shape[0]
        grey = window.astype(np.float32).mean(axis=2)
        dark = grey < (np.median(grey[y0:y1, x0:x1]) + np.median(grey)) / 2
        ys, xs = np.nonzero(dark)
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        assert np.abs(np.array([xs.mean(), ys.mean()]) - centre).max() < 0.1 * (x1 - x0)
        assert lab_mean.shape == lab_std.shape == (3,)


def test_device_augmentation_changes_training_crops_only() -> None:
    image, box = _cell_field()
    runtime = classification_sample(image, box, SPEC, (64, 64), 0.15, None, device_strength=1.0)
    assert np.array_equal(runtime, classification_sample(image, box, SPEC, (64, 64), 0.15, None))
    plain = [classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s)) for s in range(40)]
    device = [classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s), device_strength=1.0) for s in range(40)]
    assert all(crop.shape == (3, 64, 64) and crop.dtype == np.float32 for crop in device)
    # Another microscope's view (white balance, lamp, stain left after normalization) spreads the cells'
    # colour balance wider than the plain augmentation does.
    def balance_spread(crops):
        return np.std([crop[0].mean() - crop[2].mean() for crop in crops])

    assert balance_spread(device) > 1.2 * balance_spread(plain)
    tensor, labels = segmentation_sample(image, np.zeros(image.shape[:2], np.uint8), SPEC, (192, 256), np.random.default_rng(0), 1.0)
    assert tensor.shape == (3, 192, 256) and labels.shape == (192, 256)


def test_turning_the_chroma_keeps_each_pixels_grey_level() -> None:
    rgb = np.random.default_rng(0).random((3, 8, 8))
    turned = turn_chroma(rgb, 40.0, 1.3)
    assert np.allclose(turned.mean(axis=0), rgb.mean(axis=0))  # only the colour moves
    assert not np.allclose(turned, rgb)
    assert np.allclose(turn_chroma(turned, -40.0, 1 / 1.3), rgb)  # a turn and a scale, undone by their inverse
    assert np.allclose(turn_chroma(rgb, 0.0, 0.0), np.repeat(rgb.mean(axis=0, keepdims=True), 3, axis=0))  # no saturation: grey


def test_chroma_augmentation_spreads_the_hue_of_training_crops_only() -> None:
    image, box = _cell_field()
    runtime = classification_sample(image, box, SPEC, (64, 64), 0.15, None, chroma_strength=1.0)
    assert np.array_equal(runtime, classification_sample(image, box, SPEC, (64, 64), 0.15, None))

    def hue_spread(crops):  # the spread (degrees) of the hue of the cell's mean colour (the crop's centre)
        hues = []
        for crop in crops:
            r, g, b = crop[:, 24:40, 24:40].mean(axis=(1, 2))
            hues.append(np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)))
        return np.std(hues)

    plain = [classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s)) for s in range(40)]
    turned = [classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s), chroma_strength=1.0) for s in range(40)]
    assert all(crop.shape == (3, 64, 64) and crop.dtype == np.float32 for crop in turned)
    assert hue_spread(turned) > 1.5 * hue_spread(plain)


def _detail(crop: np.ndarray) -> float:
    """The mean squared difference between neighbouring pixels (sharp edges and fine texture): what a coarser camera loses."""
    return float((np.diff(crop, axis=2) ** 2).mean() + (np.diff(crop, axis=1) ** 2).mean())


def test_a_crop_at_lower_resolution_keeps_its_size_and_colour_and_loses_detail() -> None:
    rng = np.random.default_rng(0)
    crop = rng.normal(0.0, 1.0, (3, 64, 64)).astype(np.float32)  # pixel-level texture, as fine chromatin
    crop[0, 16:48, 16:48] += 2.0  # and a cell-sized blob
    lowered = resolution_lowered(crop, np.random.default_rng(1))
    assert lowered.shape == crop.shape and lowered.dtype == np.float32
    assert _detail(lowered) < 0.6 * _detail(crop)
    assert abs(float(lowered[0, 20:44, 20:44].mean()) - float(crop[0, 20:44, 20:44].mean())) < 0.3  # the blob stays where it was


def test_resolution_augmentation_lowers_that_share_of_training_crops_only() -> None:
    image, box = _cell_field()
    runtime = classification_sample(image, box, SPEC, (64, 64), 0.15, None, resolution_share=1.0)
    assert np.array_equal(runtime, classification_sample(image, box, SPEC, (64, 64), 0.15, None))
    plain = [_detail(classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s))) for s in range(20)]
    lowered = [_detail(classification_sample(image, box, SPEC, (64, 64), 0.15, np.random.default_rng(s), resolution_share=1.0)) for s in range(20)]
    assert np.mean(lowered) < 0.8 * np.mean(plain)


def test_box_jitter_moves_boxes_as_far_as_asked_and_none_keeps_them():
    box = (100, 100, 200, 200)

    def spread(jitter: tuple[float, float]) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        boxes = np.array([jitter_box(box, rng, jitter) for _ in range(400)], float)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        return float(centres.std(axis=0).mean()), float(np.log(boxes[:, 2] - boxes[:, 0]).std())

    shift, size = spread(BOX_JITTER)
    wider_shift, wider_size = spread((2 * BOX_JITTER[0], 2 * BOX_JITTER[1]))
    assert 3.5 < shift < 6.5 and 0.07 < size < 0.13  # ~5 px and ~10 % on a 100 px box
    assert 1.7 < wider_shift / shift < 2.3 and 1.7 < wider_size / size < 2.3
    rng = np.random.default_rng(0)
    assert {jitter_box(box, rng, (0.0, 0.0)) for _ in range(20)} == {box}


def test_a_capture_fault_adds_noise_or_compression_and_keeps_the_frame_s_shape() -> None:
    import cv2

    frame = np.full((96, 128, 3), 200, np.uint8)
    cv2.circle(frame, (64, 48), 30, (150, 40, 90), -1)
    flat = (slice(0, 12), slice(0, 12))  # background: any change there is noise or a JPEG artefact
    changed = 0
    for seed in range(12):
        faulty = capture_degraded(frame, np.random.default_rng(seed))
        assert faulty.shape == frame.shape and faulty.dtype == np.uint8
        assert np.array_equal(faulty, capture_degraded(frame, np.random.default_rng(seed)))  # the draws decide it all
        difference = faulty.astype(float) - frame
        changed += not np.array_equal(faulty, frame)
        assert difference[flat].std() <= 3 * CAPTURE_NOISE[1]
    assert changed == 12
