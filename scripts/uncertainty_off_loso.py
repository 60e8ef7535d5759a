"""Leave one device out with the domain check's uncertainty term switched off: what the fields it refuses would
have said. Every argument goes to `leukoedge gate` as it is; the domain section that command fits (without the
left-out device) gets max_uncertainty 1.0, so only the colour and cell-size terms refuse.

    python scripts/uncertainty_off_loso.py --data ../shared/data --bundle <leave-one-device-out bundle> \\
        --leave-out txl-pbc/raabin txl-pbc/bcd --cache DIR

Compare its table with the same `leukoedge gate` command's (docs/training.md, "Bundle 0.10.0"): the false flags
among the fields judged here that the uncertainty term refuses there are the confident wrong answers it prevents.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leukoedge.domain as domain  # noqa: E402
from leukoedge.cli import main  # noqa: E402

fit_with_uncertainty = domain.fit_domain


def fit_without_uncertainty(*args, **kwargs) -> dict:
    spec = fit_with_uncertainty(*args, **kwargs)
    spec["max_uncertainty"] = 1.0  # the mean of 1 - top class probability never exceeds 1 - 1/3
    return spec


if __name__ == "__main__":
    domain.fit_domain = fit_without_uncertainty  # training/gate.py imports it from leukoedge.domain when it fits
    raise SystemExit(main(["gate", *sys.argv[1:]]))
