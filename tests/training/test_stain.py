"""Training's stain helpers keep the runtime's normalization settings."""

import numpy as np

from leukoedge.preprocess.cpu import StainReference
from leukoedge.training.stain import estimate_reference, jitter_reference


def test_jittered_references_keep_the_lightness_gain_floor():
    reference = StainReference((70.0, 5.0, 2.0), (14.0, 12.0, 15.0), min_lightness_gain=0.8)
    jittered = jitter_reference(reference, np.random.default_rng(0))
    assert jittered.lab_mean != reference.lab_mean and jittered.lab_std != reference.lab_std
    assert jittered.min_lightness_gain == 0.8


def test_the_estimated_reference_is_the_mean_of_the_images_statistics_with_the_floor_given():
    dark = np.zeros((8, 8, 3), np.uint8)
    light = np.full((8, 8, 3), 255, np.uint8)
    reference = estimate_reference([dark, light], min_lightness_gain=0.7)
    assert reference.lab_mean[0] == np.float32(50.0)  # L* 0 and 100
    assert reference.lab_std == (1.0, 1.0, 1.0)  # flat images: std floored at 1
    assert reference.min_lightness_gain == 0.7
