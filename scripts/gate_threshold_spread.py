"""How firmly the validation fields pin the gate's threshold down: the threshold is the highest that keeps
MIN_GATE_RECALL (0.98) of the validation white cells (training/gate.choose_threshold), so it reads the few
lowest-scoring white cells, a sparse tail. Resampling those white cells (a bootstrap) shows how far the threshold
would move with another validation sample of the same size, for a bundle's own gate; the thresholds of gates trained
with other seeds (`leukoedge gate --seed N`) are to be read against that spread (docs/training.md, "TXL-PBC's box
labels looked at again"). Also each threshold's recall of white cells and rejection of the rest.

    python scripts/gate_threshold_spread.py --data ../shared/data [--bundle models/default] [--cache DIR] [--thresholds 0.3 0.5 0.7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402


def bootstrap_thresholds(white_cell_scores: np.ndarray, min_recall: float, draws: int, seed: int = 0) -> np.ndarray:
    """choose_threshold's threshold on `draws` resamples (with replacement) of the white cells' gate scores."""
    from leukoedge.training.gate import choose_threshold

    rng = np.random.default_rng(seed)
    ones = np.ones(len(white_cell_scores), int)
    return np.array([choose_threshold(rng.choice(white_cell_scores, len(white_cell_scores)), ones, min_recall) for _ in range(draws)])


def main() -> int:
    from leukoedge.training.gate import MIN_GATE_RECALL, GateRecipe, choose_threshold, split_examples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default", help="a bundle with a gate")
    parser.add_argument("--cache", type=Path, default=None, help="leukoedge gate's example cache, if one was kept")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    args = parser.parse_args()
    detector = Detector.load(args.bundle)
    if detector.gate is None:
        print(f"error: {args.bundle} has no gate", file=sys.stderr)
        return 2
    examples = split_examples(detector, args.data, "val", GateRecipe().val_per_source, 0, args.cache)
    scores = detector.white_cell_probabilities(examples.crops.astype(np.float32))
    white = scores[examples.labels == 1]
    chosen = choose_threshold(scores, examples.labels, MIN_GATE_RECALL)
    spread = np.quantile(bootstrap_thresholds(white, MIN_GATE_RECALL, args.draws), [0.05, 0.5, 0.95])
    print(f"{args.bundle.name} ({detector.bundle.model_version}): gate threshold {detector.gate_spec['threshold']:.3f} in the manifest")
    print(f"validation proposals: {len(white)} white cells, {int((examples.labels == 0).sum())} other objects")
    print(f"threshold keeping {MIN_GATE_RECALL:.2f} of these white cells: {chosen:.3f}; over {args.draws} resamples of the white cells: "
          f"5 % {spread[0]:.3f}, median {spread[1]:.3f}, 95 % {spread[2]:.3f}")
    print(f"the white cells' lowest scores: {', '.join(f'{value:.2f}' for value in np.sort(white)[:20])}")
    print("| threshold | white cells kept | other objects rejected |")
    print("|---|---|---|")
    for threshold in sorted(set(args.thresholds) | {round(chosen, 3)}):
        print(f"| {threshold:.3f} | {np.mean(white >= threshold):.3f} | {np.mean(scores[examples.labels == 0] < threshold):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
