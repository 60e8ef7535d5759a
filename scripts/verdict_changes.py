"""The fields of a source whose frame verdict differs between two bundles: which fields a candidate bundle flags
that the shipped one does not (and the other way round), with each field's blast fraction and its cells' blast
probabilities under both, so a changed figure in `leukoedge evaluate` can be traced to the fields behind it.

    python scripts/verdict_changes.py --data ../shared/data --before models/default --after CANDIDATE \\
        [--source all-taleqani] [--split test] [--min-change 0.2] [--draw DIR]

--after-int8 MODEL runs the after bundle in FP32 with that model's INT8 file in its place, as `leukoedge calibrate`'s
gate does: `--before models/default --after models/default --after-int8 classifier --split train` counts the fields
quantizing the classifier alone flags or clears.

It ends with the flag's changes counted per truth (fields only one bundle flags) and, for the malignant fields,
the exact two-sided McNemar p-value of the two bundles flagging them alike: whether a sensitivity drop on a small
test split is more than the fields one bundle happens to catch (p near 1) or a real loss (p below 0.05).

--draw writes, per changed field, the two bundles' overlays side by side (Result.draw: masks, boxes, blast
probabilities, verdict), before on the left: what a person would rather look at than read.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge.backends import create_backend  # noqa: E402
from leukoedge.bundle import model_file  # noqa: E402
from leukoedge.detector import Detector  # noqa: E402
from leukoedge.result import Result  # noqa: E402
from leukoedge.training import data  # noqa: E402


def describe(result: Result) -> str:
    blast = ", ".join(f"{cell.blast_probability:.2f}" for cell in result.cells)
    return f"{result.verdict.status}, flagged {result.verdict.flagged}, blast fraction {result.verdict.blast_fraction:.3f}, cells [{blast}]"


def mcnemar_p(only_before: int, only_after: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split of the discordant fields at least this uneven if
    either bundle were as likely to flag each of them (a binomial test at one half)."""
    discordant = only_before + only_after
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_before, only_after) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="the bundle compared against (e.g. models/default)")
    parser.add_argument("--after", type=Path, required=True, help="the candidate bundle")
    parser.add_argument("--source", default="all-taleqani", help="data source (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--min-change", type=float, default=0.2, help="also list fields whose blast fraction moved this much (default: %(default)s)")
    parser.add_argument("--draw", type=Path, default=None, help="write each changed field's before | after overlays here (PNG)")
    parser.add_argument(
        "--after-int8", choices=("segmenter", "classifier"), default=None,
        help="run the after bundle in FP32 with this model's INT8 file in its place (as the INT8 gate does)",
    )
    args = parser.parse_args()
    if args.draw is not None:
        args.draw.mkdir(parents=True, exist_ok=True)
    before = Detector.load(args.before)
    after = Detector.load(args.after, precision="fp32" if args.after_int8 else None)
    if args.after_int8:
        int8 = after.bundle.path(model_file(after.bundle.manifest, args.after_int8, "int8"))  # BundleError where it has none
        setattr(after, args.after_int8, create_backend("onnxruntime", int8))
    changed = 0
    only = {(truth, side): 0 for truth in (True, False) for side in ("before", "after")}  # flagged by one bundle only
    records = data.load_records(args.data, args.source, args.split)
    for record in records:
        image = data.read_image(record)
        old, new = before.run(image), after.run(image)
        if old.verdict.flagged != new.verdict.flagged and record.blast is not None:
            only[(bool(record.blast), "before" if old.verdict.flagged else "after")] += 1
        moved = abs(new.verdict.blast_fraction - old.verdict.blast_fraction) >= args.min_change
        if old.verdict.flagged != new.verdict.flagged or old.verdict.status != new.verdict.status or moved:
            changed += 1
            truth = "" if record.blast is None else f" (truth: {'blast' if record.blast else 'no blast'})"
            print(f"{record.image_path.name}{truth}\n  before: {describe(old)}\n  after:  {describe(new)}")
            if args.draw is not None:
                side_by_side = np.hstack([old.draw(image), np.full((image.shape[0], 8, 3), 255, np.uint8), new.draw(image)])
                cv2.imwrite(str(args.draw / f"{record.image_path.stem}.png"), side_by_side)
    print(f"{changed} of {len(records)} {args.source} {args.split} fields changed")
    if any(record.blast is not None for record in records):
        print(
            f"malignant fields flagged by before only {only[(True, 'before')]}, after only {only[(True, 'after')]} "
            f"(McNemar p = {mcnemar_p(only[(True, 'before')], only[(True, 'after')]):.3f}); "
            f"benign fields flagged by before only {only[(False, 'before')]}, after only {only[(False, 'after')]}"
        )


if __name__ == "__main__":
    main()
