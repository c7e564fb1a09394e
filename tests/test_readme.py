"""The README is the front page: its two commands are the ones CI runs, and every page and anchor it or docs/ link
to exists, so a newcomer following them never hits a dead end."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def bash_blocks(text: str) -> list[list[str]]:
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_ci_runs_exactly_the_readme_two_commands():
    blocks = bash_blocks(README.read_text(encoding="utf-8"))
    install_and_run, tests = blocks[0], blocks[1]
    assert len(install_and_run) == 1 and "python -m frugal_spin recipes/cpu_tiny.yaml" in install_and_run[0]
    assert tests == ["python -m pytest -q"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    commands = [line for line in ci if not line.startswith(("set ", "cd "))]
    assert commands == [install_and_run[0], tests[0], "bash .ci/oldest"]  # then the oldest supported versions


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # an external address: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors_of(file):
            broken.append(target)
    assert not broken, f"{page.name}: dead links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_recipe_exists(page):
    recipes = set(re.findall(r"\brecipes/[\w.-]+\.yaml", page.read_text(encoding="utf-8")))
    missing = sorted(r for r in recipes if not (REPO / r).is_file())
    assert not missing, f"{page.name} names recipes that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(README.read_text(encoding="utf-8"))}
    assert {p.name for p in PAGES[1:]} <= linked
