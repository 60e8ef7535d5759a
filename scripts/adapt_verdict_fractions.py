"""`leukoedge gate ... --labelled-frames N` (leave one device out, then labelled adaptation), printing the Taleqani
validation verdict's balanced accuracy of the original and of the adapted models at both the original and the adapted
flag fraction beside what adaptation's own check reads: whether a refused adaptation lost verdicts or only chose a
stricter flag fraction (docs/training.md, "Again with the runtime of 2026-12-07").

    python scripts/adapt_verdict_fractions.py --data ../shared/data --bundle B --leave-out txl-pbc/raabin txl-pbc/bcd \\
        --cache DIR --labelled-frames 40

Every argument goes to `leukoedge gate` as it is. Lines starting "fractions:" come in pairs per adaptation: the
original models, then the adapted ones.
"""

from __future__ import annotations

import sys

from leukoedge.cli import main
from leukoedge.training import adapt

FLAG_FRACTIONS = (0.714, 0.75)  # raabin's original and adapted flag fractions in the run the docs quote
_balanced_accuracy = adapt.balanced_accuracy


def balanced_accuracy_both_ways(fractions, malignant, flag_fraction: float) -> float:
    value = _balanced_accuracy(fractions, malignant, flag_fraction)
    others = ", ".join(f"at {other}: {_balanced_accuracy(fractions, malignant, other):.4f}" for other in FLAG_FRACTIONS)
    print(f"fractions: at {flag_fraction:.3f} (the check's): {value:.4f}; {others}", flush=True)
    return value


if __name__ == "__main__":
    adapt.balanced_accuracy = balanced_accuracy_both_ways  # adapt_models reads it through the module
    sys.argv = ["leukoedge", "gate", *sys.argv[1:]]
    raise SystemExit(main())
