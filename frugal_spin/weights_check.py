"""Do a model directory's weights fit the model its config.json describes? Checked from the safetensors headers
alone, before anything is loaded.

Inputs: the tensor names and shapes the config's model expects (its `state_dict` built on the `meta` device: no
memory, no weights read) and those the weights files hold (their headers). Output: the missing, unexpected and
mismatched names, and one line that says which.

Why: transformers loads a checkpoint that lacks tensors (a truncated export, a config with more layers than the
weights) by initialising the missing ones at random, ignores tensors it has no place for (a config with fewer
layers: half a model) and only warns; with bitsandbytes 4-bit it does not even notice a tensor whose shape differs
from the config's (the packed 4-bit parameter has no shape to compare). Each of these trains and reports numbers
of a model that is not the user's, silently. The rules follow transformers' own: a tied weight (`lm_head` tied to
the embedding) may be absent, buffers that older checkpoints saved (`rotary_emb.inv_freq`, `position_ids`) and the
model's `_keys_to_ignore_on_load_*` patterns are ignored, and names are mapped through its renamings and the
base-model prefix. Models whose checkpoints transformers converts on load (fused MoE experts: `WeightConverter`s)
get only the shape check of names that match one to one; the load itself then checks the rest
(`model.check_loading_info`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

# Buffers older checkpoints saved that current models no longer keep as persistent (transformers ignores them too).
LEGACY_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|(^|\.)position_ids)$")


@dataclass
class Mismatch:
    missing: list[str] = field(default_factory=list)  # the config's model needs them; the weights lack them
    unexpected: list[str] = field(default_factory=list)  # in the weights; no place for them in the config's model
    # name -> (shape in the weights, shape the config makes)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)


def compare(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], optional: Iterable[str] = (),
            ignore_missing: Iterable[str] = (), ignore_unexpected: Iterable[str] = (),
            names_only_partly: bool = False, modules: Iterable[str] = ()) -> Mismatch:
    """`found` (already renamed to the model's names) against `expected`. `optional`: names that may be absent
    (tied weights); `ignore_*`: regex patterns; `names_only_partly`: the load converts some names, so only shapes
    of matching names are compared; `modules`: the model's module names. A tensor the model has no place for is
    a leftover, not lost weights, when its module exists and it is neither a `weight` nor a `bias` (a buffer an
    older version saved, e.g. GPT-2's `attn.masked_bias`); any other one is reported."""
    optional, modules = set(optional), set(modules)
    missing_re = _alternation(ignore_missing)
    unexpected_re = _alternation(ignore_unexpected, LEGACY_BUFFERS.pattern)
    result = Mismatch()
    for name, shape in found.items():
        if name in expected:
            if tuple(expected[name]) != tuple(shape):
                result.shapes[name] = (tuple(shape), tuple(expected[name]))
            continue
        if not names_only_partly and not unexpected_re.search(name) and not is_leftover(name, modules):
            result.unexpected.append(name)
    if not names_only_partly:
        result.missing = [name for name in expected if name not in found and name not in optional
                          and not (missing_re and missing_re.search(name))]
    return result


def is_leftover(name: str, modules: set[str]) -> bool:
    """A tensor of a module the model has that is neither its `weight` nor its `bias`: an old buffer, not weights."""
    module, _, leaf = name.rpartition(".")
    return module in modules and leaf not in ("weight", "bias")


def _alternation(patterns: Iterable[str], *extra: str):
    parts = [p for p in (*patterns, *extra) if p]
    return re.compile("|".join(f"({p})" for p in parts)) if parts else None


def summarize(names: Iterable[str], limit: int = 3) -> str:
    """Tensor names, grouped by their numbered part: `model.layers.{2, 3}.* (18 tensors)`; at most `limit` groups
    are shown, the rest counted."""
    groups: dict[str, tuple[set[int], list[str]]] = {}
    for name in sorted(names, key=_natural):
        m = re.match(r"^(.*?\.)(\d+)\.(.+)$", name)
        if m:
            indices, rests = groups.setdefault(m.group(1), (set(), []))
            indices.add(int(m.group(2)))
            rests.append(m.group(3))
        else:
            groups.setdefault(name, (set(), []))
    parts = []
    for head, (indices, rests) in groups.items():
        if not indices:
            parts.append(head)
            continue
        ids = str(next(iter(indices))) if len(indices) == 1 else "{" + _ranges(sorted(indices)) + "}"
        kinds = sorted(set(rests))
        parts.append(f"{head}{ids}.{kinds[0]}" if len(kinds) == 1 else f"{head}{ids}.* ({len(rests)} tensors)")
    shown = ", ".join(p[:120] for p in parts[:limit])
    return shown + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans = []
    start = prev = values[0]
    for value in values[1:] + [None]:
        if value is None or value != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = value
        prev = value
    return ", ".join(spans)


def describe(mismatch: Mismatch, weights: str = "the weights", layers: tuple[int, int] | None = None) -> str:
    """One line: what does not fit, the largest problem first. `layers`: (num_hidden_layers of config.json, the
    number of layers the weights hold), named when they differ."""
    said = []
    if layers is not None and layers[0] != layers[1]:
        said.append(f"config.json says num_hidden_layers={layers[0]}, {weights} hold {layers[1]} layers")
    if mismatch.shapes:
        name, (got, want) = next(iter(mismatch.shapes.items()))
        said.append(f"{len(mismatch.shapes)} tensor(s) have other shapes than config.json gives them "
                    f"({summarize(mismatch.shapes)}), e.g. {name[:120]}: {list(got)} in {weights}, {list(want)} "
                    f"from config.json")
    if mismatch.missing:
        said.append(f"{len(mismatch.missing)} tensor(s) the model needs are missing from {weights} "
                    f"({summarize(mismatch.missing)})")
    if mismatch.unexpected:
        said.append(f"{len(mismatch.unexpected)} tensor(s) in {weights} have no place in the model "
                    f"({summarize(mismatch.unexpected)})")
    return "; ".join(said)


def layer_count(names: Iterable[str], prefix_re: str = r"(?:^|\.)layers\.(\d+)\.") -> int | None:
    """How many decoder layers the names hold (`...layers.<i>.`), or None when they have no such names."""
    indices = {int(m.group(1)) for name in names for m in [re.search(prefix_re, name)] if m}
    return max(indices) + 1 if indices else None
