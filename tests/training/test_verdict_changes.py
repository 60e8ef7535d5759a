"""scripts/verdict_changes.py: the paired test of two bundles' flags on the same fields."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from verdict_changes import mcnemar_p  # noqa: E402


def test_mcnemar_p_is_the_exact_two_sided_binomial_tail_of_the_discordant_fields():
    assert mcnemar_p(0, 0) == 1.0  # no field changed: no evidence either way
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(7, 2) == pytest.approx(2 * (1 + 9 + 36) / 512)  # P(X <= 2 | 9, 1/2), both tails
    assert mcnemar_p(2, 7) == mcnemar_p(7, 2)
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)  # ten fields lost, none gained: a real loss
    assert mcnemar_p(10, 0) < 0.05 < mcnemar_p(7, 2)
