"""`leukoedge gate ... --labelled-frames N` (leave one device out, then labelled adaptation), printing the Taleqani
validation fields the original and the adapted models flag (malignant and benign) at both the original and the adapted
flag fraction beside what adaptation's own check reads: whether a refused adaptation lost verdicts or only chose a
stricter flag fraction (docs/training.md, "Again with the runtime of 2026-12-07"). `--recipe NAME=VALUE` (repeatable)
changes a default of training/adapt.LabelledRecipe the CLI does not reach, for trying recipes (docs/training.md,
"What the raabin adaptation loses").

    python scripts/adapt_verdict_fractions.py --data ../shared/data --bundle B --leave-out txl-pbc/raabin txl-pbc/bcd \\
        --cache DIR --labelled-frames 40 [--recipe replay_per_source=160 --recipe keep_weight=4]

Every other argument goes to `leukoedge gate` as it is. Lines starting "fractions:" come in pairs per adaptation: the
original models, then the adapted ones.
"""

from __future__ import annotations

import dataclasses
import sys

from leukoedge.cli import main
from leukoedge.training import adapt

FLAG_FRACTIONS = (0.714, 0.75)  # raabin's original and adapted flag fractions in the run the docs quote
_counts = adapt.VerdictCounts.of


def counts_both_ways(fractions, malignant, flag_fraction: float) -> adapt.VerdictCounts:
    counts = _counts(fractions, malignant, flag_fraction)
    others = "; ".join(f"at {other}: {_counts(fractions, malignant, other).line()}" for other in FLAG_FRACTIONS)
    print(f"fractions: at {flag_fraction:.3f} (the check's): {counts.line()}; {others}", flush=True)
    return counts


def with_recipe_defaults(changes: dict[str, str]) -> None:
    """LabelledRecipe's defaults changed (each value cast to the field's type), for every recipe made after."""
    fields = [field for field in dataclasses.fields(adapt.LabelledRecipe) if field.default is not dataclasses.MISSING]
    defaults = list(adapt.LabelledRecipe.__init__.__defaults__)
    names = [field.name for field in fields]
    for name, value in changes.items():
        if name not in names:
            raise SystemExit(f"--recipe: LabelledRecipe has no field {name!r}; it has {', '.join(names)}")
        index = names.index(name)
        defaults[index] = (int if defaults[index] is None else type(defaults[index]))(value)  # verdict_fields: None or a count
    adapt.LabelledRecipe.__init__.__defaults__ = tuple(defaults)
    print(f"recipe: {adapt.LabelledRecipe()}", flush=True)


def split_recipe(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    """The --recipe NAME=VALUE pairs, and the other arguments as given."""
    changes, rest = {}, []
    pairs = iter(arguments)
    for argument in pairs:
        if argument == "--recipe":
            name, _, value = next(pairs).partition("=")
            changes[name] = value
        else:
            rest.append(argument)
    return changes, rest


if __name__ == "__main__":
    recipe, arguments = split_recipe(sys.argv[1:])
    if recipe:
        with_recipe_defaults(recipe)
    adapt.VerdictCounts.of = staticmethod(counts_both_ways)  # adapt_models reads it through the class
    sys.argv = ["leukoedge", "gate", *arguments]
    raise SystemExit(main())
