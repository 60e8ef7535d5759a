"""The frame verdict's flag_fraction is chosen on validation fields."""

import numpy as np

from leukoedge.training.verdict import choose_flag_fraction


def test_separable_fields_get_a_threshold_between_the_classes():
    benign = [0.0, 0.1, 0.25, 0.3]
    malignant = [0.45, 0.6, 0.9]
    threshold, balanced_accuracy = choose_flag_fraction(benign + malignant, [0] * 4 + [1] * 3, default=0.2)
    assert 0.3 < threshold <= 0.45
    assert balanced_accuracy == 1.0


def test_overlapping_fields_get_the_fewest_false_flags_within_one_standard_error_of_the_best():
    from leukoedge.training.verdict import balanced_accuracies, bootstrap_standard_error

    rng = np.random.default_rng(0)
    benign, malignant = rng.uniform(0.0, 0.6, 200), rng.uniform(0.4, 1.0, 200)
    fractions, labels = np.concatenate([benign, malignant]), np.array([0] * 200 + [1] * 200)
    threshold, balanced_accuracy = choose_flag_fraction(fractions, labels, default=0.2)
    candidates = np.unique(fractions)
    scores = balanced_accuracies(fractions, labels, candidates)
    best = scores.max()
    margin = bootstrap_standard_error(fractions, labels, candidates[scores == best][-1])
    assert 0.0 < margin < 0.05
    assert best - margin - 1e-12 <= balanced_accuracy < best  # a random split: the best itself is rarely the safest
    flagged_benign = (benign >= threshold).sum()
    for other, score in zip(candidates, scores):
        if score >= best - margin - 1e-12:  # none the fields cannot tell apart flags fewer benign fields
            assert (benign >= other).sum() >= flagged_benign
    assert 0.35 < threshold < 0.65


def test_one_more_malignant_field_flagged_does_not_outweigh_one_false_flag_within_the_noise():
    # 60 benign fields, one of them at 0.72; 100 malignant, 2 of them at 0.7. At 0.7 both are flagged and so is the
    # benign one (the best balanced accuracy, 0.992); at 0.9 neither (0.990, within the noise of 60 benign fields).
    fractions = [0.1] * 59 + [0.72] + [0.9] * 98 + [0.7] * 2
    labels = [0] * 60 + [1] * 100
    candidates = np.unique(fractions)
    from leukoedge.training.verdict import balanced_accuracies

    scores = balanced_accuracies(np.array(fractions), np.array(labels), candidates)
    assert candidates[scores.argmax()] == 0.7
    threshold, balanced_accuracy = choose_flag_fraction(fractions, labels, default=0.2)
    assert threshold == 0.9 and balanced_accuracy == 0.99


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
    from leukoedge.training.verdict import FLAG_FRACTION_RULE, MIN_BLAST_COUNT

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from verdict_rule import with_verdict_rule

    original = load_bundle(tiny_bundle).manifest
    assert original["verdict"]["min_blast_count"] == MIN_BLAST_COUNT == 2
    choice = with_verdict_rule(tiny_bundle, data_root, 3, tmp_path / "copy")
    copied = load_bundle(tmp_path / "copy").manifest
    assert copied["verdict"]["min_blast_count"] == 3
    assert copied["verdict"]["flag_fraction"] == choice["flag_fraction"]
    assert copied["training"]["verdict_rule"]["min_blast_count"] == 3
    assert copied["training"]["verdict_rule"]["rule"] == FLAG_FRACTION_RULE  # the manifest says how it was chosen
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
