"""Installs are reproducible and the declared version ranges are the tested ones (offline checks).

constraints.txt pins what the suite and the published CPU figures were measured with; the README's install command
and .ci/run install through it. constraints-oldest.txt pins pyproject.toml's lower bounds, which are the versions
GPU users get through `.[unsloth]`; .ci/oldest installs it in a fresh venv and runs part of the suite there. Both
files are `pip freeze` of fresh venvs (.ci/lock); these tests keep them consistent with pyproject.toml and the docs.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOCKS = {"constraints.txt": ["dev"], "constraints-oldest.txt": ["dev", "unsloth"]}

# Lower bounds that constraints-oldest.txt does not pin, and why; every other lower bound must be pinned exactly.
UNTESTED_FLOORS = {
    "torch": "2.11 is the GPU machine's (a CUDA build); CI tests the 2.13 CPU wheel",
    "pyyaml": "utility with a stable API; the oldest set takes what pip resolves",
    "rich": "utility with a stable API; the oldest set takes what pip resolves",
    "matplotlib": "3.7's wheels predate numpy 2, which transformers 5 needs",
    "psutil": "utility with a stable API; the oldest set takes what pip resolves",
    "sacrebleu": "text metric (chrF/BLEU) with a stable API; the oldest set takes what pip resolves",
    "regex": "transformers 5.17 itself needs a newer regex (>=2025.10.22)",
    "pytest-timeout": "test tooling",
    "nbclient": "test tooling (notebook execution)",
    "nbformat": "test tooling (notebook execution)",
    "ipykernel": "test tooling (notebook execution)",
    "gguf": "read through transformers' GGUF loader, which names its own minimum",
    "tensorboard": "only its event-file reader is used",
}

# unsloth 2026.10.9's published requirements on what we also depend on (its wheel's METADATA): the oldest set is
# what `.[unsloth]` installs, so it must satisfy both these and our ranges.
UNSLOTH_2026_10_9 = {
    "torch": "<2.15.0,>=2.4.0",
    "transformers": "!=4.53.0,!=4.54.0,!=4.55.0,!=4.55.1,!=4.57.0,!=4.57.4,!=4.57.5,!=5.0.0,!=5.1.0,<=5.17.0,>=4.52.4",
    "datasets": "!=4.0.*,!=4.1.0,!=4.4.*,!=4.5.0,<5.0.0,>=3.4.1",
    "trl": "!=0.19.0,<=1.15.0,>=0.18.2",
    "peft": "!=0.11.0,>=0.18.0",
    "accelerate": ">=0.34.1",
    "bitsandbytes": "!=0.46.0,!=0.48.0,>=0.45.5",
}

# The GPU machine this project is checked on (python 3.12, torch 2.11+cu130, transformers 5.17, triton 3.6).
GPU_MACHINE = {"torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0"}


def pins(name: str) -> dict[str, Version]:
    """`name==version` lines of a lock file (comments allowed), by canonical name; anything else is an error."""
    found: dict[str, Version] = {}
    for raw in (REPO / name).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.!+-]*)", line)
        assert match, f"{name}: not a plain pin: {raw!r}"
        key = canonicalize_name(match[1])
        assert key not in found, f"{name}: {match[1]} pinned twice"
        found[key] = Version(match[2])
    return found


def requirements(extras: list[str]) -> list[Requirement]:
    """The project's requirements for these extras that apply on this platform."""
    reqs = [(Requirement(r), None) for r in PROJECT["dependencies"]]
    reqs += [(Requirement(r), e) for e in extras for r in PROJECT["optional-dependencies"][e]]
    return [r for r, extra in reqs if r.marker is None or r.marker.evaluate({"extra": extra or ""})]


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_is_pinned_within_its_declared_range(lock):
    pinned = pins(lock)
    for req in requirements(LOCKS[lock]):
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{lock} does not pin {req.name} (regenerate it: bash .ci/lock)"
        assert req.specifier.contains(version, prereleases=True), f"{lock}: {req.name}=={version} outside {req}"


@pytest.mark.parametrize("lock", LOCKS)
def test_pins_are_portable(lock):
    """No local version labels (this machine's torch is 2.13.0+cpu; PyPI's is 2.13.0) and no platform-only
    packages that pip would fail to find elsewhere."""
    for name, version in pins(lock).items():
        assert version.local is None, f"{lock}: {name}=={version}"


def test_the_oldest_set_is_the_declared_lower_bounds():
    pinned = pins("constraints-oldest.txt")
    checked = []
    for req in requirements(LOCKS["constraints-oldest.txt"]):
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if not floors or canonicalize_name(req.name) in UNTESTED_FLOORS:
            continue
        assert pinned[canonicalize_name(req.name)] == max(floors), f"{req}: the oldest set pins another version"
        checked.append(canonicalize_name(req.name))
    assert {"transformers", "datasets", "peft", "accelerate", "bitsandbytes", "triton", "unsloth"} <= set(checked)
    declared = {canonicalize_name(r.name) for r in requirements(LOCKS["constraints-oldest.txt"])}
    assert set(UNTESTED_FLOORS) <= declared  # no stale excuse


def test_what_gpu_users_install_is_inside_the_declared_ranges():
    """`.[unsloth]` must not contradict the ranges: the oldest set satisfies unsloth's caps as well as ours, and
    the GPU machine's versions are admitted."""
    pinned = pins("constraints-oldest.txt")
    for name, spec in UNSLOTH_2026_10_9.items():
        assert SpecifierSet(spec).contains(pinned[name]), f"constraints-oldest.txt: {name}=={pinned[name]} vs {spec}"
    declared = {canonicalize_name(r.name): r.specifier for r in requirements(["dev", "unsloth"])}
    for name, version in GPU_MACHINE.items():
        assert declared[name].contains(version), f"pyproject.toml refuses the GPU machine's {name} {version}"
    python = SpecifierSet(PROJECT["requires-python"])
    assert python.contains("3.11") and python.contains("3.12")  # CI's and the GPU machine's


def test_cpu_figures_name_the_pinned_versions():
    """A published CPU figure (a line naming torch 2.13.0+cpu) names the transformers, peft and bitsandbytes that
    constraints.txt pins: re-measure, or pin what the figures were measured with."""
    pinned = pins("constraints.txt")
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "profiling").glob("*.md")]
    seen = 0
    for page in pages:
        for line in page.read_text(encoding="utf-8").splitlines():
            if "2.13.0+cpu" not in line:
                continue
            for name, version in re.findall(r"\b(transformers|peft|bitsandbytes) (\d+\.\d+\.\d+)", line):
                assert pinned[name] == Version(version), f"{page.name}: {name} {version}, constraints.txt {pinned[name]}"
                seen += 1
    assert seen >= 3


def test_the_readme_install_and_ci_use_the_constraints():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r'pip install -e "\.\[dev\]" -c constraints\.txt', readme)
    ci = (REPO / ".ci" / "oldest").read_text(encoding="utf-8")
    assert "-c constraints-oldest.txt" in ci and ".[dev,unsloth]" in ci
