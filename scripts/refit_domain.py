"""A copy of a bundle with its domain check fitted again on the validation fields, everything else kept (the gate,
its threshold, the flag fraction): for a bundle whose segmenter was swapped (scripts/swap_mask_model.py), whose
uncertainty the check reads. `leukoedge gate --bundle B --out O` does this too, and trains a new gate and chooses the
flag fraction again beside it (docs/performance.md, "A lighter field segmenter").

    python scripts/refit_domain.py --bundle DIR --data ../shared/data --out DIR2 [--only max_noise]

--only keeps the rest of the bundle's domain section as it is and takes only the keys named from the new fit: a new
check added to a bundle without moving the thresholds it already has (bundle 0.11.0's focus check, 0.12.0's noise
check: docs/training.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from leukoedge import Detector  # noqa: E402
from leukoedge.bundle import save_bundle  # noqa: E402


def refit_domain(bundle_dir: Path, data_root: Path, out_dir: Path, per_source: int | None = None, only: list[str] | None = None) -> dict:
    """Write the copy to out_dir; returns its domain section, fitted as `leukoedge gate` fits it (on per_source
    validation fields of every source/device; default: the gate recipe's), or, with `only`, the bundle's own section
    with those keys taken from the fit."""
    from leukoedge.training.gate import GateRecipe, validation_domain

    detector = Detector.load(bundle_dir)
    domain = validation_domain(detector, data_root, per_source or GateRecipe().val_per_source)
    if only:
        missing = [key for key in only if key not in domain]
        if missing:
            raise SystemExit(f"error: the fit has no {missing}; it has {sorted(domain)}")
        domain = {**detector.bundle.manifest["domain"], **{key: domain[key] for key in only}}
    manifest = copy.deepcopy(detector.bundle.manifest)
    manifest["domain"] = domain
    save_bundle(out_dir, manifest, {name: detector.bundle.path(name) for name in manifest["files"]})
    return domain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle to copy")
    parser.add_argument("--data", type=Path, required=True, help="the data folder (../shared/data)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copy to")
    parser.add_argument("--only", nargs="+", default=None, metavar="KEY", help="take only these keys of the domain section from the fit (e.g. max_noise)")
    args = parser.parse_args()
    domain = refit_domain(args.bundle, args.data, args.out, only=args.only)
    print(
        f"{args.out}: domain check fitted on {domain['fitted_on']['frames']} validation fields: "
        f"colour distance <= {domain['max_colour_distance']:.2f}, segmenter uncertainty <= {domain['max_uncertainty']:.3f}, "
        f"white cells at least {domain.get('min_cell_side_px', 0):.1f} px across, their edges at most {domain.get('max_edge_width', float('nan')):.2f} wide, "
        f"their noise at most {domain.get('max_noise', float('nan')):.2f} grey levels, JPEG files of quality {domain.get('min_jpeg_quality', '-')} or more"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
