"""Which fields of a device left out of the gate and the domain check lose their white cells: field by field, what
`leukoedge gate --leave-out` sums into its table (box recall and precision, refusals, false flags).

    python scripts/left_out_fields.py --data ../shared/data --bundle <leave-one-device-out bundle> \\
        --leave-out txl-pbc/bcd --cache DIR [--proposals-from BUNDLE ...]

For each left-out source/device, the gate is trained and the domain check fitted without it as `leukoedge gate` does
(training/gate.apply_left_out, on the examples that command collects and caches), then every normal field of it in
the evaluated split is run: the annotated white-cell boxes missed at IoU 0.5, the cells found that match none, the
proposals the gate rejected, and the verdict. Only fields with a miss, an extra cell, a refusal or a flag are printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> int:
    from leukoedge.training import data
    from leukoedge.training.detection import box_iou, greedy_matches, normal_records
    from leukoedge.training.gate import GateRecipe, apply_left_out, collected_examples, frame_domain, gate_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle whose classifier never saw the left-out devices")
    parser.add_argument("--leave-out", nargs="+", required=True, metavar="SOURCE", help="sources/devices, e.g. txl-pbc/bcd")
    parser.add_argument("--proposals-from", nargs="*", default=[], metavar="BUNDLE", help="as `leukoedge gate --proposals-from`")
    parser.add_argument("--cache", type=Path, default=None, help="as `leukoedge gate --cache` (the examples are reused)")
    args = parser.parse_args()

    recipe = GateRecipe(proposals_from=tuple(str(path) for path in args.proposals_from))
    detectors, train, validation = collected_examples(args.data, args.bundle, recipe, args.cache)
    detector = detectors[0]
    validation_frames = frame_domain(detector, gate_records(args.data, "val", recipe.val_per_source))
    evaluated = normal_records(args.data, recipe.eval_split, limit=recipe.eval_per_source)
    for source in args.leave_out:
        _, threshold = apply_left_out(detector, train, validation, validation_frames, source, recipe)
        fields = [record for record in evaluated if record.domain.startswith(source)]
        print(f"## {source} left out: gate threshold {threshold:.2f}, {len(fields)} {recipe.eval_split} fields")
        for record in fields:
            result = data.run_record(detector, record)
            truth = data.object_boxes(record).get("WBC", [])
            found = [cell.box for cell in result.cells]
            matches = greedy_matches(box_iou(found, truth))
            missed = [box for index, box in enumerate(truth) if index not in {column for _, column in matches}]
            extra = [box for index, box in enumerate(found) if index not in {row for row, _ in matches}]
            verdict = result.verdict
            if missed or extra or verdict.status not in ("ok", "no_cells") or verdict.flagged or (truth and not found):
                print(
                    f"{record.image_path.name}: {verdict.status}{' FLAGGED' if verdict.flagged else ''}; "
                    f"missed {[tuple(round(v) for v in box) for box in missed]}, extra {[tuple(round(v) for v in box) for box in extra]}, "
                    f"proposals the gate rejected {verdict.non_wbc_count}" + (f"; {verdict.reason}" if verdict.reason else "")
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
