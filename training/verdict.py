"""The frame verdict's threshold, chosen on held-out validation fields instead of assumed.

A frame is flagged when its blast fraction reaches `flag_fraction`. Benign B-lineage precursors
(hematogones) look like blasts to a cell classifier, so benign fields carry a non-zero blast
fraction: the threshold that separates fields is a property of the model and is measured on the
Taleqani validation split (malignant vs benign fields), never on the test split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def choose_flag_fraction(blast_fractions: Sequence[float], malignant: Sequence[int], default: float) -> tuple[float, float | None]:
    """(threshold, balanced accuracy at it) maximizing balanced accuracy over the observed fractions.

    Returns (default, None) when one class is missing or no threshold beats chance (balanced accuracy
    0.5, e.g. a barely trained model): nothing can be chosen from such a set.
    Ties go to the highest threshold (fewer false alarms at equal balanced accuracy).
    """
    fractions = np.asarray(blast_fractions, dtype=float)
    labels = np.asarray(malignant, dtype=int)
    if fractions.size == 0 or labels.min() == labels.max():
        return default, None
    best_threshold, best_score = default, -1.0
    for threshold in np.unique(fractions):
        flagged = fractions >= threshold
        sensitivity = flagged[labels == 1].mean()
        specificity = (~flagged[labels == 0]).mean()
        score = (sensitivity + specificity) / 2
        if score >= best_score:
            best_threshold, best_score = float(threshold), float(score)
    if best_score <= 0.5:
        return default, None
    return best_threshold, best_score
