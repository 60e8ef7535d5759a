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


def test_a_trained_bundle_flags_from_two_blasts_and_a_copy_can_ask_for_another_count(tiny_bundle, data_root, tmp_path):
    # leukoedge train writes the rule; scripts/verdict_rule.py writes a copy with another count, its flag fraction
    # chosen again on the flagging fractions, every model file the same.
    import sys
    from pathlib import Path

    from leukoedge import Detector
    from leukoedge.bundle import load_bundle
    from leukoedge.training.verdict import MIN_BLAST_COUNT

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from verdict_rule import with_verdict_rule

    original = load_bundle(tiny_bundle).manifest
    assert original["verdict"]["min_blast_count"] == MIN_BLAST_COUNT == 2
    choice = with_verdict_rule(tiny_bundle, data_root, 3, tmp_path / "copy")
    copied = load_bundle(tmp_path / "copy").manifest
    assert copied["verdict"]["min_blast_count"] == 3
    assert copied["verdict"]["flag_fraction"] == choice["flag_fraction"]
    assert copied["training"]["verdict_rule"]["min_blast_count"] == 3
    assert {name: digest for name, digest in copied["files"].items()} == original["files"]
    with Detector.load(tmp_path / "copy") as detector:
        assert detector.verdict_terms()[2] == 3


def test_the_flag_fraction_curve_counts_a_field_at_two_thirds_as_flagged_at_0_667():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from flag_fraction_curve import curve

    fractions = np.array([2 / 3, 0.5, 1.0, 0.0, 2 / 3])
    malignant = np.array([True, True, True, False, False])
    rows = {threshold: (sensitivity, specificity, flagged) for threshold, sensitivity, specificity, flagged in curve(fractions, malignant, [0.5, 0.667, 0.7])}
    assert rows[0.667] == (2 / 3, 0.5, 1)  # 2 of 3 blasts flags at 0.667
    assert rows[0.7] == (1 / 3, 1.0, 0)
    assert rows[0.5] == (1.0, 0.5, 1)


def test_resampled_fields_choose_one_threshold_when_the_fields_are_clear_and_several_when_not():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from flag_fraction_curve import bootstrap_choices

    malignant = np.array([True] * 40 + [False] * 20)
    clear = np.concatenate([np.full(40, 0.9), np.full(20, 0.1)])  # every malignant field above every benign one
    assert bootstrap_choices(clear, malignant, 50) == {0.9: 1.0}
    rng = np.random.default_rng(1)
    overlapping = np.concatenate([rng.uniform(0.5, 1.0, 40), rng.uniform(0.0, 0.8, 20)])
    shares = bootstrap_choices(overlapping, malignant, 200)
    assert len(shares) > 1 and abs(sum(shares.values()) - 1.0) < 1e-9
