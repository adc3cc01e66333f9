"""The prose of the notebooks cannot drift from their outputs.

A number typed into a Markdown cell is either a fixed fact of the notebook or a measurement.
Fixed facts are fine in prose when the notebook itself states them: they appear in a code
cell (a configuration, a constant) or in the output of a ``# NBVAL_CHECK_OUTPUT`` cell, which
is identical in every profile. A measurement (a loss, a distance, a timing) depends on the
profile, so the notebook prints it and its sentences from code (``display(Markdown(...))``),
where re-executing in another profile rewrites them; typed into a Markdown cell it would go
stale. This test fails on any number in the prose that neither code nor a deterministic
output of the same notebook contains, and says which cell and number.

Small counting numbers (0 to 12) and years (1900 to 2099) are not checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
STRIP = [
    re.compile(r"```.*?```", re.S),                 # fenced code
    re.compile(r"\{[a-z:]+\}`[^`]*`"),              # MyST roles: {cite}`...`, {eq}`...`, {doc}`...`
    re.compile(r"`[^`]*`"),                         # inline code names a thing, it quotes no result
    re.compile(r"\]\([^)]*\)"),                     # link targets
    re.compile(r"https?://\S+"),
    re.compile(r"^\(.*\)=\s*$", re.M),              # (label)= targets
    re.compile(r"\\(?:label|tag|eqref|ref)\{[^}]*\}"),
    re.compile(r"\b(?:Figure|Fig\.|Table|Section|[Cc]hapter)s?\s+\d+(?:\.\d+)?"),   # cross-references
    re.compile(r"\([a-z0-9-]+\)\s*$", re.M),        # equation labels after $$ ... $$
]


def _source(cell) -> str:
    return "".join(cell.get("source", ""))


def _normalise(number: str) -> str:
    return number.replace(",", "").replace("_", "")


def numbers_in(text: str) -> set[str]:
    """Numbers as written, without thousands separators: '4,500' -> '4500', '0.50' -> '0.50'."""
    return {_normalise(m.group(1)) + (m.group(2) or "") for m in NUMBER.finditer(text)}


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append("".join(out["text"]))
        for mime in ("text/plain", "text/markdown", "text/html"):
            if mime in out.get("data", {}):
                parts.append("".join(out["data"][mime]))
    return "\n".join(parts)


def _is_exempt(number: str) -> bool:
    if "." in number:
        return False
    value = int(number)
    return value <= 12 or 1900 <= value <= 2099


def _known(nb) -> tuple[set[str], set[str]]:
    """Numbers the notebook states itself, and numbers only its profile-dependent outputs print."""
    fixed, measured = set(), set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = _source(cell)
        fixed |= numbers_in(source.replace("_", ""))
        out = numbers_in(_outputs_text(cell))
        if "NBVAL_CHECK_OUTPUT" in source:
            fixed |= out
        else:
            measured |= out
    return fixed, measured - fixed


def prose_problems(nb) -> list[str]:
    fixed, measured = _known(nb)
    problems = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = _source(cell)
        for pattern in STRIP:
            text = pattern.sub(" ", text)
        for number in sorted(numbers_in(text)):
            if _is_exempt(number) or number in fixed:
                continue
            if number in measured:
                problems.append(f"cell {index}: {number} is a measurement (a profile-dependent "
                                "output); print the sentence from code instead of typing it")
            else:
                problems.append(f"cell {index}: {number} appears in no code cell and no "
                                "NBVAL_CHECK_OUTPUT output of this notebook")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_numbers_come_from_the_notebook(path):
    problems = prose_problems(json.loads(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_the_check_catches_a_typed_measurement():
    nb = {"cells": [
        {"cell_type": "code", "source": "# NBVAL_CHECK_OUTPUT\nprint(round(2 ** 0.5, 4))",
         "outputs": [{"output_type": "stream", "text": "1.4142\n"}]},
        {"cell_type": "code", "source": "steps = 4_000\nprint(loss)",
         "outputs": [{"output_type": "stream", "text": "loss 92.39\n"}]},
        {"cell_type": "markdown", "source": "After 4,000 steps, sqrt 2 = 1.4142 and the loss is 92.39; "
                                            "see {eq}`eq-17` in 2014, with 3 seeds and 3.5 bits."},
    ]}
    problems = prose_problems(nb)
    assert len(problems) == 2
    assert any("92.39 is a measurement" in p for p in problems)
    assert any("3.5 appears in no code cell" in p for p in problems)
