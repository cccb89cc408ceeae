"""The README stays a front door and the documentation stays true to the code: generated tables match, links
resolve, the test command is the one CI runs, and nothing points outside the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from app.config_docs import modes_table
from app.http.routes.predict import Prediction

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MODES_START, MODES_END = "<!-- modes-table:start -->", "<!-- modes-table:end -->"
REGENERATE = '.venv/bin/python -c "from app.config_docs import modes_table; print(modes_table())"'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# The README's example: the /predict call and the JSON answer after it, up to the end of its code block.
README_EXAMPLE = re.compile(r"^\$ curl [^\n]*/predict[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Paths a user of the product does not have: other checkouts, the machine's scratch space, home directories.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/(?:tmp|work|home|root)/")


def between(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1 and text.count(end) == 1, f"needs one {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose = FENCE.sub("", page.read_text())
    return {anchor(line.lstrip("#")) for line in prose.splitlines() if re.match(r"#{1,6} ", line)}


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, or inside `list[...]` and `... | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in(arg)]


def mismatches(example: Any, annotation: Any, where: str) -> list[str]:
    """Where the example's keys differ from the fields of the model its annotation names, at every depth."""
    if isinstance(example, list):
        return [found for item in example for found in mismatches(item, annotation, f"{where}[]")]
    models = models_in(annotation)
    if not isinstance(example, dict) or not models:
        return []  # a value, a null, or a mapping with keys of its own (per-label probabilities)
    (model,) = models
    fields = model.model_fields
    found = [] if example.keys() == fields.keys() else [f"{where}: {sorted(example)} != {sorted(fields)}"]
    for name in example.keys() & fields.keys():
        found += mismatches(example[name], fields[name].annotation, f"{where}.{name}")
    return found


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move the detail to docs/"


def test_the_readme_table_of_modes_is_the_generated_one() -> None:
    assert between(README.read_text(), MODES_START, MODES_END) == modes_table(), (
        f"README.md's table of modes is out of date: replace what stands between {MODES_START} and {MODES_END} "
        f"with the output of\n    {REGENERATE}"
    )


def test_the_readme_example_has_the_fields_of_the_answer() -> None:
    example = README_EXAMPLE.search(README.read_text())
    assert example, "README.md needs its example: `$ curl ... /predict ...` and the JSON answer, in one code block"
    found = mismatches(json.loads(example.group(1)), Prediction, "answer")
    assert not found, f"README.md's example answer no longer has the fields of /predict's response: {found}"


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    readme = README.read_text()
    assert re.search(r"^make serve\b", readme, re.MULTILINE) and re.search(r"^make test\b", readme, re.MULTILINE)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE), ".ci/run must run the README's test command, `make test`"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (resolved.suffix == ".md" and fragment and fragment not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_no_path_outside_the_repository(page: Path) -> None:
    found = [line for line in page.read_text().splitlines() if OUTSIDE.search(line)]
    assert not found, f"{page.name} names paths a user of the product does not have: {found}"


def test_the_screenshot_stays_small() -> None:
    assert (ROOT / "docs" / "page.png").stat().st_size < 200_000
