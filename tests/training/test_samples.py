"""Training samples: the labels must stay on the pixels they describe through every augmentation."""

import numpy as np
import pytest

from leukoedge.preprocess.cpu import PreprocessSpec, StainReference, lab_statistics, prepare_crops, to_rgb_float
from leukoedge.training.data import LABEL_BACKGROUND, LABEL_NUCLEUS
from leukoedge.training.samples import refiner_sample, segmentation_sample

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
