"""Which colour features should the domain check read? The frame's L*a*b* means and spreads before stain
normalization (bundles before 0.7.0) against the correlations of its L*a*b* channels after it (0.7.0 on), judged by
what the check is for: refuse the frames the models would get wrong, judge the ones they get right.

    python scripts/colour_check_study.py --data ../shared/data --bundle models/default --leave-out txl-pbc/raabin

Both checks are fitted, as `leukoedge gate` fits them, on the validation fields of every source/device (less the
--leave-out one). Printed:
- the left-out device's normal test fields refused by each check (a new microscope: its frames should be judged
  where the models judge them right);
- every third validation field changed as another device might change it, each change on its own: the training
  augmentation's device change (stain shift and scale, white balance, lamp, blur, noise, JPEG) at four strengths,
  hue turned about the grey axis (another dye or protocol: the stain normalization matches each channel's mean and
  spread, not the hues), saturation scaled, and the colour channels swapped (an integrator passing RGB as BGR). Per
  change: the share each check refuses, how many frame verdicts changed (flagged <-> not) against the unchanged
  field and how many of those each check lets through, and how many normal fields were flagged and let through.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leukoedge import Detector
from leukoedge.domain import COLOUR_FEATURES, MEAN_SPREAD_FEATURES, colour_distance, colour_features, fit_domain, segmenter_uncertainty
from leukoedge.training import data
from leukoedge.training.detection import NORMAL_SOURCES, normal_records
from leukoedge.training.gate import GateRecipe, gate_records
from leukoedge.training.stain import augment_device, turn_chroma

CHECKS = {"means and spreads (before 0.7.0)": MEAN_SPREAD_FEATURES, "channel correlations (0.7.0)": COLOUR_FEATURES}


def turned(frame_bgr: np.ndarray, degrees: float, saturation: float = 1.0) -> np.ndarray:
    """The frame with its hues turned by `degrees` about the grey axis and its saturation scaled."""
    rgb = frame_bgr[..., ::-1].astype(np.float32).transpose(2, 0, 1)
    out = turn_chroma(rgb, degrees, saturation).transpose(1, 2, 0)[..., ::-1]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def changes(frame: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """(name, changed frame) for each device change the study makes."""
    out = [(f"device change x{strength}", augment_device(frame, rng, strength)) for strength in (0.5, 1.0, 1.5, 2.0)]
    out += [(f"hue turned {degrees} deg", turned(frame, degrees * rng.choice([-1, 1]))) for degrees in (15, 30, 45, 60, 90)]
    out += [(f"saturation x{scale}", turned(frame, 0.0, scale)) for scale in (0.5, 0.7, 1.4, 2.0)]
    out.append(("channels swapped", np.ascontiguousarray(frame[..., ::-1])))
    return out


def features(detector: Detector, frame: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """The frame's features under each check, and the segmenter's uncertainty."""
    found = detector.candidates(frame)
    by_check = {name: colour_features(found.prepared, detector.spec, names) for name, names in CHECKS.items()}
    return by_check, segmenter_uncertainty(found.prepared, found.probabilities)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle whose models answer")
    parser.add_argument("--leave-out", default=None, help="a source/device left out of the fitting, e.g. txl-pbc/raabin")
    parser.add_argument("--every", type=int, default=3, help="change every n-th validation field (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    detector = Detector.load(args.bundle)
    detector.domain_spec = None  # the verdicts the models give; each check is applied below
    records = [r for r in gate_records(args.data, "val", GateRecipe().val_per_source) if not (args.leave_out and r.domain.startswith(args.leave_out))]
    measured = [features(detector, data.read_image(r)) for r in tqdm(records, desc="validation fields", unit="field")]
    sources = [r.domain for r in records]
    specs = {
        name: fit_domain([m[0][name] for m in measured], [m[1] for m in measured], sources, seed=args.seed, features=names)
        for name, names in CHECKS.items()
    }

    def refused(name: str, by_check: dict[str, np.ndarray]) -> bool:
        return colour_distance(specs[name], by_check[name]) > specs[name]["max_colour_distance"]

    print(f"Both checks fitted on {len(records)} validation fields" + (f", {args.leave_out} left out" if args.leave_out else "") + ".\n")
    if args.leave_out:
        test = [r for r in normal_records(args.data, "test", limit=GateRecipe().eval_per_source) if r.domain.startswith(args.leave_out)]
        left_out = [features(detector, data.read_image(r))[0] for r in tqdm(test, desc=args.leave_out, unit="field")]
        print(f"| check | {args.leave_out} normal test fields refused |\n|---|---|")
        for name in CHECKS:
            print(f"| {name} | {np.mean([refused(name, f) for f in left_out]):.3f} ({sum(refused(name, f) for f in left_out)} of {len(left_out)}) |")
        print()

    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[tuple[dict[str, bool], bool, bool]]] = defaultdict(list)  # change -> (refused per check, verdict changed, normal field flagged)
    for record in tqdm(records[:: args.every], desc="changed fields", unit="field"):
        frame = data.read_image(record)
        flagged_before = detector.run(frame).verdict.flagged
        normal = record.domain.split("/")[0] in NORMAL_SOURCES
        for change, changed in changes(frame, rng):
            by_check, _ = features(detector, changed)
            flagged = detector.run(changed).verdict.flagged
            rows[change].append(({name: refused(name, by_check) for name in CHECKS}, flagged != flagged_before, normal and flagged))
    short = {name: name.split(" (")[0] for name in CHECKS}
    names = list(CHECKS)
    header = " | ".join(f"refused: {short[n]}" for n in names)
    let_through = " | ".join(f"let through: {short[n]}" for n in names)
    print(f"| change | fields | {header} | verdicts changed | {let_through} | normal fields flagged | {let_through} |")
    print("|---" * (3 + 3 * len(names) + 1) + "|")
    totals = np.zeros(3 + 3 * len(names), int)
    for change, results in rows.items():
        refusals = [np.mean([r[0][n] for r in results]) for n in names]
        verdict = [sum(r[1] for r in results)] + [sum(r[1] and not r[0][n] for r in results) for n in names]
        flags = [sum(r[2] for r in results)] + [sum(r[2] and not r[0][n] for r in results) for n in names]
        totals += np.array([len(results)] + [sum(r[0][n] for r in results) for n in names] + verdict + flags)
        print(f"| {change} | {len(results)} | " + " | ".join(f"{v:.2f}" for v in refusals) + " | " + " | ".join(map(str, verdict)) + " | " + " | ".join(map(str, flags)) + " |")
    count = totals[0]
    refused_all = " | ".join(f"{totals[1 + i] / count:.2f}" for i in range(len(names)))
    rest = totals[1 + len(names) :]
    print(f"| all | {count} | {refused_all} | " + " | ".join(map(str, rest)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
