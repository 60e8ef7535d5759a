"""The frame verdict's flag_fraction is chosen on validation fields."""

import numpy as np

from leukoedge.training.verdict import choose_flag_fraction


def test_separable_fields_get_a_threshold_between_the_classes():
    benign = [0.0, 0.1, 0.25, 0.3]
    malignant = [0.45, 0.6, 0.9]
    threshold, balanced_accuracy = choose_flag_fraction(benign + malignant, [0] * 4 + [1] * 3, default=0.2)
    assert 0.3 < threshold <= 0.45
    assert balanced_accuracy == 1.0


def test_overlapping_fields_maximize_balanced_accuracy():
    rng = np.random.default_rng(0)
    benign, malignant = rng.uniform(0.0, 0.6, 200), rng.uniform(0.4, 1.0, 200)
    fractions, labels = np.concatenate([benign, malignant]), np.array([0] * 200 + [1] * 200)
    threshold, balanced_accuracy = choose_flag_fraction(fractions, labels, default=0.2)
    for other in np.linspace(0.0, 1.0, 41):  # no other threshold does better
        flagged = fractions >= other
        assert (flagged[labels == 1].mean() + (~flagged[labels == 0]).mean()) / 2 <= balanced_accuracy + 1e-12
    assert 0.35 < threshold < 0.65


def test_one_class_only_keeps_the_default():
    assert choose_flag_fraction([0.1, 0.5], [1, 1], default=0.2) == (0.2, None)
    assert choose_flag_fraction([], [], default=0.2) == (0.2, None)


def test_no_threshold_better_than_chance_keeps_the_default():
    assert choose_flag_fraction([0.0, 0.0, 0.0, 0.0], [0, 1, 0, 1], default=0.2) == (0.2, None)
