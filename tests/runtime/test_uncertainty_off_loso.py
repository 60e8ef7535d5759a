"""scripts/uncertainty_off_loso.py: the domain check fitted as usual, its uncertainty term switched off."""

from __future__ import annotations

import numpy as np

from leukoedge.domain import COLOUR_FEATURES, fit_domain


def test_only_the_uncertainty_threshold_is_lifted(script) -> None:
    rng = np.random.default_rng(0)
    colour, uncertainty = rng.normal(0, 1, (12, len(COLOUR_FEATURES))), rng.uniform(0.01, 0.05, 12)
    sources = ["a"] * 6 + ["b"] * 6
    usual = fit_domain(colour, uncertainty, sources)
    lifted = script("uncertainty_off_loso").fit_without_uncertainty(colour, uncertainty, sources)
    assert usual["max_uncertainty"] < 0.1 and lifted["max_uncertainty"] == 1.0
    assert {key: value for key, value in lifted.items() if key != "max_uncertainty"} == {key: value for key, value in usual.items() if key != "max_uncertainty"}
