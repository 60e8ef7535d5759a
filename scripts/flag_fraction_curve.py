"""The Taleqani verdict of a bundle at every flag fraction: sensitivity, specificity and benign fields flagged per
threshold (and the frame subtype's accuracy), on the validation and test splits, next to the fraction the bundle carries and the one its validation
fields would choose (training/verdict.choose_flag_fraction). Shows how flat the choice is: where the 60 benign
validation fields flag the same few over a range, balanced accuracy chooses on sensitivity alone.

    python scripts/flag_fraction_curve.py --data ../shared/data --bundles shipped=models/default [other=DIR ...] \\
        [--thresholds 0.5 0.6 0.667 0.7 0.75 0.8] [--splits train val test] [--bootstrap 1000]

`--splits train` adds the training split's fields (283 benign against validation's 60): the classifier learnt their
cells, so each bundle's figures there are optimistic, but bundles that share the classifier can be compared on them
where 60 benign fields cannot tell them apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.detector import Detector  # noqa: E402
from leukoedge.training import data  # noqa: E402
from leukoedge.training.verdict import choose_flag_fraction  # noqa: E402


def curve(fractions: np.ndarray, malignant: np.ndarray, thresholds: list[float]) -> list[tuple[float, float, float, int]]:
    """(threshold, sensitivity, specificity, benign fields flagged) at each threshold; a field flags at fraction >= threshold."""
    rows = []
    for threshold in thresholds:
        flagged = fractions >= threshold - 5e-4  # thresholds are given to 3 decimals: 2 of 3 blasts flags at 0.667
        rows.append((threshold, float(flagged[malignant].mean()), float((~flagged[~malignant]).mean()), int(flagged[~malignant].sum())))
    return rows


def bootstrap_choices(fractions: np.ndarray, malignant: np.ndarray, resamples: int, seed: int = 0) -> dict[float, float]:
    """How often choose_flag_fraction picks each threshold on fields resampled with replacement (malignant and benign
    apart, so each resample keeps the split's counts): how firmly these fields choose. Thresholds to 3 decimals."""
    rng = np.random.default_rng(seed)
    malignant_index, benign_index = np.flatnonzero(malignant), np.flatnonzero(~malignant)
    counts: dict[float, int] = {}
    for _ in range(resamples):
        index = np.concatenate([rng.choice(malignant_index, malignant_index.size), rng.choice(benign_index, benign_index.size)])
        threshold, _ = choose_flag_fraction(fractions[index], malignant[index].astype(int), float("nan"))
        counts[round(threshold, 3)] = counts.get(round(threshold, 3), 0) + 1
    return {threshold: count / resamples for threshold, count in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundles", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.6, 0.667, 0.7, 0.75, 0.8])
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["val", "test"])
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="also: how often N resamples of the validation fields choose each flag fraction")
    args = parser.parse_args()
    for name, path in (item.split("=", 1) for item in args.bundles):
        detector = Detector.load(path)
        carried = detector.verdict_terms()[1]
        print(f"## {name}: flag fraction {carried:.3f}, from {detector.verdict_terms()[2]} blasts")
        for split in args.splits:
            records = data.load_records(args.data, "all-taleqani", split)
            verdicts = [detector.run(data.read_image(record)).verdict for record in tqdm(records, desc=f"Taleqani {split}", unit="field", leave=False)]
            fractions = np.array([verdict.flagging_fraction for verdict in verdicts])  # what the flag reads (as training/verdict.py)
            malignant = np.array([bool(record.blast) for record in records])
            subtype = np.mean([verdict.subtype == record.subtype for verdict, record in zip(verdicts, records)])
            chosen = ""
            if split == "val":
                threshold, balanced = choose_flag_fraction(fractions, malignant.astype(int), carried)
                chosen = f"; these fields would choose {threshold:.3f} (balanced accuracy {balanced:.3f})" if balanced is not None else ""
                if args.bootstrap:
                    shares = bootstrap_choices(fractions, malignant, args.bootstrap)
                    chosen += f"; {args.bootstrap} resamples choose " + ", ".join(f"{value:.3f} ({share:.0%})" for value, share in shares.items() if share >= 0.01)
            print(f"{split}: {int(malignant.sum())} malignant, {int((~malignant).sum())} benign fields, subtype accuracy {subtype:.3f}{chosen}")
            print("| flag fraction | sensitivity | specificity | benign fields flagged |\n|---|---|---|---|")
            for threshold, sensitivity, specificity, flagged in curve(fractions, malignant, sorted({*args.thresholds, carried})):
                mark = " (carried)" if abs(threshold - carried) < 1e-9 else ""
                print(f"| {threshold:.3f}{mark} | {sensitivity:.3f} | {specificity:.3f} | {flagged} |")
            print()


if __name__ == "__main__":
    main()
