"""scripts/borderline_fields.py: a field is one cell from a flag when its most blast-like normal cell would flag it."""

from __future__ import annotations


def test_a_field_is_one_cell_from_a_flag_only_when_that_cell_would_flag_it(script) -> None:
    module = script("borderline_fields")
    rule = (0.5, 0.7, 2)  # blast threshold, flag fraction, minimum blasts
    assert module.flags([0.9, 0.8, 0.1], *rule) is False  # 2 of 3 blasts: under 0.7
    assert module.flags([0.9, 0.8], *rule) is True
    assert module.one_cell_from_flag([0.9, 0.4], *rule)  # TXL-PBC raabin's kind: one blast and one near it
    assert not module.one_cell_from_flag([0.9, 0.4, 0.1, 0.1], *rule)  # 2 of 4 even with it
    assert not module.one_cell_from_flag([0.1, 0.2], *rule)  # one blast is not enough
    assert not module.one_cell_from_flag([0.9, 0.8], *rule)  # already flagged
    assert not module.one_cell_from_flag([], *rule)


def test_a_stricter_rule_needs_its_blasts_sure_and_leaves_the_bundle_s_rule_as_it_is(script) -> None:
    module = script("borderline_fields")
    rule = (0.5, 0.7, 2)
    assert module.flags([0.9, 0.62], *rule) and not module.flags([0.9, 0.62], *rule, 0.7)  # raabin's JPEG-70 field
    assert module.flags([0.9, 0.75], *rule, 0.7)
    assert module.one_cell_from_flag([0.9, 0.4], *rule, 0.7)  # the raised cell counts as sure
    assert not module.one_cell_from_flag([0.6, 0.4], *rule, 0.7)  # its one blast is not sure enough
    assert module.flags([0.9, 0.8], *rule, 0.3) == module.flags([0.9, 0.8], *rule)  # under the threshold: the bundle's rule
