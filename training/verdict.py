"""The frame verdict's threshold, chosen on held-out validation fields instead of assumed.

A frame is flagged when its blast fraction reaches `flag_fraction` and it holds at least
MIN_BLAST_COUNT blasts (manifest verdict.min_blast_count). Benign B-lineage precursors
(hematogones) look like blasts to a cell classifier, so benign fields carry a non-zero blast
fraction: the threshold that separates fields is a property of the model and is measured on the
Taleqani validation split (malignant vs benign fields), never on the test split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from leukoedge.detector import Detector

from . import data

DEFAULT_FLAG_FRACTION = 0.2  # used only where the validation fields cannot choose one (e.g. --quick)
# A lone blast-like cell does not flag a frame. Every false flag of the normal test fields (PBC 2 of 304, TXL-PBC
# raabin 3 of 50 with bundle 0.4.0) was a frame whose one white cell was called a blast; 3 of 326 malignant Taleqani
# test fields are flagged from one blast (sensitivity 0.963 -> 0.954). The cell still counts: in the frame's
# blast count and in a session's tally, where a smear's blasts add up over its fields.
MIN_BLAST_COUNT = 2


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


def taleqani_verdicts(detector: Detector, records: Sequence[data.Record]) -> tuple[list[float], list[int]]:
    """The detector's flagging fraction (Verdict.flagging_fraction: what the flag reads) and the truth (1 malignant)
    of Taleqani fields."""
    fractions, malignant = [], []
    for record in tqdm(records, desc="verdicts (Taleqani val)", unit="field", leave=False):
        fractions.append(detector.run(data.read_image(record)).verdict.flagging_fraction)
        malignant.append(int(record.blast))
    return fractions, malignant


def flag_fraction_on(detector: Detector, records: Sequence[data.Record]) -> tuple[float, dict]:
    """The flag fraction chosen on these Taleqani (validation) fields with the detector as it is, and its record
    for the manifest's training section."""
    fractions, malignant = taleqani_verdicts(detector, records)
    threshold, balanced_accuracy = choose_flag_fraction(fractions, malignant, DEFAULT_FLAG_FRACTION)
    return float(threshold), {"flag_fraction": float(threshold), "balanced_accuracy": balanced_accuracy, "fields": len(fractions)}
