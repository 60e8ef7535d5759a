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
BOOTSTRAP_RESAMPLES = 1000  # the flag fraction's standard error (choose_flag_fraction)
# How the flag fraction was chosen, as the manifest's training records name it (bundles before it: the best alone).
FLAG_FRACTION_RULE = "fewest benign flagged within one bootstrap standard error of the best balanced accuracy"


def choose_flag_fraction(blast_fractions: Sequence[float], malignant: Sequence[int], default: float) -> tuple[float, float | None]:
    """(threshold, balanced accuracy at it): of the observed fractions whose balanced accuracy is within one
    standard error of the best (the one-standard-error rule of Breiman et al., 1984), the one that flags the fewest
    benign fields, and of those the lowest (the most malignant fields flagged).

    The best threshold alone is not what the fields can tell: with 60 benign validation fields, thresholds from 0.6
    to 0.75 flag the same one or two benign fields and the best then falls on whichever catches one more malignant
    field; resampled, the fields chose the shipped bundle's 0.7 in a third of the resamples only
    (scripts/flag_fraction_curve.py --bootstrap). Among the thresholds the fields cannot tell apart, fewer false
    flags come first because a false flag on a normal smear is the product's worst outcome. The standard error is
    the spread of the best threshold's balanced accuracy over BOOTSTRAP_RESAMPLES resamples of the fields
    (malignant and benign apart, a fixed seed: the same fields always choose the same). Fields that separate
    cleanly have no spread and get the best threshold.

    Returns (default, None) when one class is missing or no threshold beats chance (balanced accuracy
    0.5, e.g. a barely trained model): nothing can be chosen from such a set.
    """
    fractions = np.asarray(blast_fractions, dtype=float)
    labels = np.asarray(malignant, dtype=int)
    if fractions.size == 0 or labels.min() == labels.max():
        return default, None
    thresholds = np.unique(fractions)
    scores = balanced_accuracies(fractions, labels, thresholds)
    best = int(np.flatnonzero(scores == scores.max())[-1])
    if scores[best] <= 0.5:
        return default, None
    within = np.flatnonzero(scores >= scores[best] - bootstrap_standard_error(fractions, labels, thresholds[best]) - 1e-12)
    benign_flagged = (fractions[labels == 0][None, :] >= thresholds[within, None]).sum(axis=1)
    chosen = int(within[np.flatnonzero(benign_flagged == benign_flagged.min())[0]])  # thresholds ascend: the lowest
    return float(thresholds[chosen]), float(scores[chosen])


def balanced_accuracies(fractions: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Balanced accuracy of flagging fields at fraction >= each threshold (labels 1 malignant, 0 benign)."""
    flagged = fractions[None, :] >= thresholds[:, None]
    return (flagged[:, labels == 1].mean(axis=1) + (~flagged[:, labels == 0]).mean(axis=1)) / 2


def bootstrap_standard_error(fractions: np.ndarray, labels: np.ndarray, threshold: float, resamples: int = BOOTSTRAP_RESAMPLES) -> float:
    """Standard deviation of the balanced accuracy at `threshold` over resamples of the fields with replacement,
    malignant and benign fields apart (each resample keeps the counts)."""
    rng = np.random.default_rng(0)
    flagged = fractions >= threshold
    malignant_flagged, benign_flagged = flagged[labels == 1], flagged[labels == 0]
    sensitivity = rng.choice(malignant_flagged, (resamples, malignant_flagged.size)).mean(axis=1)
    specificity = 1.0 - rng.choice(benign_flagged, (resamples, benign_flagged.size)).mean(axis=1)
    return float(np.std((sensitivity + specificity) / 2))


def taleqani_verdicts(detector: Detector, records: Sequence[data.Record]) -> tuple[list[float], list[int]]:
    """The detector's flagging fraction (Verdict.flagging_fraction: what the flag reads) and the truth (1 malignant)
    of Taleqani fields."""
    fractions, malignant = [], []
    for record in tqdm(records, desc="verdicts (Taleqani val)", unit="field", leave=False):
        fractions.append(data.run_record(detector, record).verdict.flagging_fraction)
        malignant.append(int(record.blast))
    return fractions, malignant


def flag_fraction_on(detector: Detector, records: Sequence[data.Record]) -> tuple[float, dict]:
    """The flag fraction chosen on these Taleqani (validation) fields with the detector as it is, and its record
    for the manifest's training section."""
    fractions, malignant = taleqani_verdicts(detector, records)
    threshold, balanced_accuracy = choose_flag_fraction(fractions, malignant, DEFAULT_FLAG_FRACTION)
    return float(threshold), {"flag_fraction": float(threshold), "balanced_accuracy": balanced_accuracy, "fields": len(fractions), "rule": FLAG_FRACTION_RULE}
