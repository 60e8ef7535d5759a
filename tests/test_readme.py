"""The README's Python block runs as written against the shipped bundle and a shipped sample, so the
first screen cannot drift from the code; its headline figures are the evaluation report's."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest

from leukoedge.bundle import load_bundle

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
# The README as a first screen (the issue that asked for it: at most about 10 KB).
MAX_README_BYTES = 10_500
HEADLINE_START, HEADLINE_END = "<!-- headline table", "<!-- end of headline table -->"


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def headline_rows(text: str) -> list[list[str]]:
    table = text.split(HEADLINE_START, 1)[1].split(HEADLINE_END, 1)[0]
    rows = [line.strip().strip("|").split("|") for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # past the header and its rule


def test_readme_has_exactly_one_python_block() -> None:
    assert len(fenced_blocks(README.read_text(encoding="utf-8"), "python")) == 1


def test_readme_python_block_runs_on_the_shipped_bundle_and_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    monkeypatch.chdir(REPOSITORY)  # the block names models/default and samples/ as a user in the checkout would
    printed = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the README must not teach a deprecated call
        with contextlib.redirect_stdout(printed):
            namespace: dict = {}
            exec(compile(block, str(README), "exec"), namespace)
    result = namespace["res"]
    assert result.cells, "the README's sample should show cells"
    assert namespace["record"]["cells"] and "verdict" in namespace["record"]
    lines = printed.getvalue().splitlines()
    assert len(lines) == 1 + len(result.cells) + 2  # verdict, one line per cell, timings, the refused frame
    assert "expected" in lines[-1]  # InvalidFrameError names what was expected


def test_readme_commands_name_files_that_exist() -> None:
    text = README.read_text(encoding="utf-8")
    for path in re.findall(r"(?:samples|models)/[\w./-]+\.(?:jpg|png|json)", text):
        assert (REPOSITORY / path).is_file(), path
    assert (REPOSITORY / "models" / "default" / "manifest.json").is_file()
    load_bundle(REPOSITORY / "models" / "default")  # the bundle the README loads passes its checksums


def test_readme_stays_a_first_screen() -> None:
    assert README.stat().st_size <= MAX_README_BYTES


def test_readme_says_what_it_is_not() -> None:
    text = README.read_text(encoding="utf-8")
    assert "not a certified medical device" in text and "AML" in text


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (REPOSITORY / ".ci" / "run").read_text(encoding="utf-8")
    (tests,) = [block for block in fenced_blocks(README.read_text(encoding="utf-8"), "bash") if "pytest" in block]
    assert tests.strip() in ci


def test_every_headline_figure_names_its_command() -> None:
    rows = headline_rows(README.read_text(encoding="utf-8"))
    assert len(rows) >= 5
    command = None
    for what, measured, reproduce in rows:
        command = command if reproduce == "same" else reproduce
        assert command and command.startswith("`leukoedge "), what
        assert re.search(r"\d", measured), what


@pytest.mark.skipif(not (REPOSITORY / "reports" / "evaluation.md").is_file(), reason="no evaluation report in this checkout")
def test_headline_accuracy_figures_are_the_evaluation_reports() -> None:
    """Every figure a `leukoedge evaluate` row quotes is in reports/evaluation.md, which that command wrote."""
    report = (REPOSITORY / "reports" / "evaluation.md").read_text(encoding="utf-8")
    command = None
    for what, measured, reproduce in headline_rows(README.read_text(encoding="utf-8")):
        command = command if reproduce == "same" else reproduce
        if "leukoedge evaluate" not in command:
            continue
        for figure in re.findall(r"\d\.\d{3}", measured):
            assert figure in report, f"{what}: {figure} is not in reports/evaluation.md"

