"""End to end: a small variant of recipes/cpu_tiny.yaml, then checks of the run directory against the contract and
an independent recomputation of the opponent log-probs from `base/` plus the previous adapter."""

import json
import math
from pathlib import Path

import pytest
import torch

from frugal_spin import tiny_base
from frugal_spin.__main__ import main
from frugal_spin.io import read_jsonl, read_safetensors

REPO = Path(__file__).resolve().parents[1]
from conftest import SMALL_BASE
OVERRIDES = ["data.fraction=0.05", "data.eval_size=24", "spin.iterations=2", "sft.epochs=1",
             "generation.max_new_tokens=16", "generation.batch_size=32", "eval.max_new_tokens=16"]


SEEN = {"generated_from": [], "scored": []}  # what the pipeline handed to generation and to scoring, in order


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_base_cache):
    from frugal_spin.stages import opponent

    def generate_spy(model, tokenizer, prompts, **kwargs):
        SEEN["generated_from"].append([list(p) for p in prompts])
        return generate(model, tokenizer, prompts, **kwargs)

    def score_spy(model, triples, **kwargs):
        SEEN["scored"].append([(list(p), list(y), list(g)) for p, y, g in triples])
        return score(model, triples, **kwargs)

    generate, score = opponent.generate_answers, opponent.score_pairs
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
        mp.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
        mp.setattr(opponent, "generate_answers", generate_spy)
        mp.setattr(opponent, "score_pairs", score_spy)
        assert main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={root / 'run'}", *OVERRIDES]) == 0
    return root / "run"


def _scored(run_dir: Path, row: dict) -> tuple[list[int], list[int]]:
    """The responses of a pair as the run scores them: without the end token when only one side ends."""
    from frugal_spin.turns import scored_pair

    stop_ids = json.loads((run_dir / "stages" / "setup.json").read_text())["metrics"]["stop_token_ids"]
    return scored_pair(row["real_ids"], row["generated_ids"], stop_ids)


def test_the_ids_scored_are_the_ids_generated_from_and_those_saved(run_dir):
    """One chat format everywhere: per iteration, generation starts from exactly the prompt ids that scoring
    conditions on (for the real and the generated answer) and that pairs.jsonl records. Calls in order: anchor,
    then each iteration (generation, scoring of the pairs). A pair in which only one answer ends
    (the other was cut at its length limit) is scored without that end token."""
    import sys

    for t in range(2):
        rows = read_jsonl(run_dir / f"iter_{t}" / "pairs.jsonl")
        prompts = SEEN["generated_from"][1 + t]
        scored = SEEN["scored"][1 + t]
        assert prompts == [r["prompt_ids"] for r in rows]
        assert scored == [(r["prompt_ids"], *_scored(run_dir, r)) for r in rows]
        left_out = sum(_scored(run_dir, r) != (r["real_ids"], r["generated_ids"]) for r in rows)
        record = json.loads((run_dir / "stages" / f"iter_{t}.generate.json").read_text())["metrics"]
        assert record["pairs_end_token_left_out"] == left_out > 0  # 16 new tokens cut many generated answers
        assert record["pairs_generated_truncated"] == record["answers_without_eos"] >= left_out
    setup = json.loads((run_dir / "stages" / "setup.json").read_text())
    assert setup["metrics"]["backend"] == "transformers"
    assert "unsloth" not in sys.modules  # the CPU path never imports the optional backend


def test_setup_records_the_pair_layout(run_dir):
    """The run says whether SPIN pairs were packed x+y+y' and why: the tiny Llama base on the CPU passes the
    allowlist and the probe on one real pair (shared_prompt.probe_packing)."""
    packing = json.loads((run_dir / "stages" / "setup.json").read_text())["metrics"]["pair_packing"]
    assert packing["packed"] is True and packing["reason"] == "on"
    assert 0 <= packing["probe_difference_per_token"] <= packing["tolerance_per_token"] == 1e-5


def _load_independently(run_dir: Path, adapter: str | None):
    """base/ + an adapter through the public libraries only (transformers, bitsandbytes, peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        run_dir / "base", device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    for module in model.modules():  # fp32 forward on every CPU, as the pipeline runs it
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if adapter is not None:
        model = PeftModel.from_pretrained(model, run_dir / adapter)
    return model.eval()


@torch.no_grad()
def _plain_logps(model, prompt_ids, response_ids) -> float:
    """Full logits -> log_softmax -> gather, one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits.float()[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response_ids)[:, None]).sum().item()


def test_run_directory_contract(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (run_dir / "recipe.yaml").is_file()
    AutoTokenizer.from_pretrained(run_dir / "base")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base")
    for adapter in ["sft/adapter", "iter_0/adapter", "iter_1/adapter"]:
        PeftModel.from_pretrained(base, run_dir / adapter)
    for t in (0, 1):
        rows = read_jsonl(run_dir / f"iter_{t}" / "pairs.jsonl")
        logps = read_safetensors(run_dir / f"iter_{t}" / "opponent_logps.safetensors")
        assert len(rows) == 100
        for key in ("real", "generated"):
            assert logps[key].dtype == torch.float32 and logps[key].shape == (len(rows),)
            assert torch.isfinite(logps[key]).all() and (logps[key] < 0).all()
        for row in rows:
            assert set(row) >= {"prompt", "real", "generated", "prompt_ids", "real_ids", "generated_ids"}
            assert isinstance(row["prompt"], str) and isinstance(row["generated"], str)
            assert row["real_ids"] and row["generated_ids"] and row["prompt_ids"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert stages == ["setup", "sft", "anchor", "sft.eval", "iter_0.generate", "iter_0.score", "iter_0.train",
                      "iter_0.eval", "iter_1.generate", "iter_1.score", "iter_1.train", "iter_1.eval"]
    for record in records:
        assert record["wall_time_s"] >= 0 and isinstance(record["metrics"], dict)
        if record["kind"] != "setup":  # every working stage reports its throughput
            assert record["metrics"]["tokens"] > 0 and record["metrics"]["tokens_per_s"] > 0, record["stage"]
    evals = {r["stage"]: r["metrics"] for r in records if r["kind"] == "eval"}
    for metrics in evals.values():
        assert {"heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match"} <= set(metrics)
        assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["heldout_nll"] > 0
    # After SFT the fixed opponent of the anchor pairs is the model itself: exactly log 2, margin 0.
    assert math.isclose(evals["sft.eval"]["spin_loss"], math.log(2), rel_tol=1e-6)
    assert evals["sft.eval"]["reward_margin"] == 0.0


def test_prompt_and_response_ids_are_the_chat_template(run_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "base")
    row = read_jsonl(run_dir / "iter_0" / "pairs.jsonl")[0]
    messages = [{"role": "user", "content": row["prompt"]}]
    assert row["prompt_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                              return_dict=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["real"]}],
                                         return_dict=False)
    assert row["prompt_ids"] + row["real_ids"] == full
    assert tokenizer.decode(row["generated_ids"], skip_special_tokens=True) == row["generated"]


@pytest.mark.parametrize("t, opponent", [(0, "sft/adapter"), (1, "iter_0/adapter")])
def test_cached_logps_equal_plain_recomputation_from_base_and_previous_adapter(run_dir, t, opponent):
    rows = read_jsonl(run_dir / f"iter_{t}" / "pairs.jsonl")[:12]
    cache = read_safetensors(run_dir / f"iter_{t}" / "opponent_logps.safetensors")
    model = _load_independently(run_dir, opponent)
    for i, row in enumerate(rows):
        for key, response in zip(("real", "generated"), _scored(run_dir, row)):
            plain = _plain_logps(model, row["prompt_ids"], response)
            assert abs(plain - cache[key][i].item()) <= 1e-5 * max(1.0, abs(plain)), (t, i, key)


def test_opponent_of_iteration_1_is_base_plus_iteration_0_adapter_not_the_bare_base(run_dir):
    rows = read_jsonl(run_dir / "iter_1" / "pairs.jsonl")[:8]
    cache = read_safetensors(run_dir / "iter_1" / "opponent_logps.safetensors")["real"][:8]
    for wrong in (None, "sft/adapter"):  # the bare base (the official SPIN LoRA path's mistake), a stale adapter
        model = _load_independently(run_dir, wrong)
        other = torch.tensor([_plain_logps(model, r["prompt_ids"], r["real_ids"]) for r in rows])
        assert (other - cache).abs().max() > 1e-3, wrong


def test_player_reproduces_cached_opponent_logps_at_start_of_iteration(run_dir):
    """The player starts from the opponent's adapter: in training mode, batched as in SPIN training (real and
    generated answers in one padded batch), its log-probs equal the cache and the SPIN loss is log 2."""
    from frugal_spin.config import load_recipe
    from frugal_spin.model import attach_lora, load_adapter_weights, load_base_model, load_tokenizer, resolve_runtime
    from frugal_spin.train import spin_step_fn

    recipe = load_recipe(run_dir / "recipe.yaml")
    runtime = resolve_runtime(recipe.model)
    model = attach_lora(load_base_model(str(run_dir / "base"), recipe.model, runtime), recipe.lora)
    load_adapter_weights(model, run_dir / "iter_0" / "adapter")
    rows = read_jsonl(run_dir / "iter_1" / "pairs.jsonl")
    cache = read_safetensors(run_dir / "iter_1" / "opponent_logps.safetensors")
    pad_id = load_tokenizer(str(run_dir / "base")).pad_token_id
    scored = [_scored(run_dir, r) for r in rows]
    step = spin_step_fn(model, [r["prompt_ids"] for r in rows], [s[0] for s in scored], [s[1] for s in scored],
                        cache["real"], cache["generated"], 0.1, pad_id, 1024, runtime.device)
    model.train()
    out = step(list(range(16)))
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert abs(out.metrics["reward_margin"]) < 1e-6


def test_rerun_skips_finished_stages_and_changed_beta_redoes_only_training(run_dir, small_base_cache):
    markers = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
        mp.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
        args = [str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={run_dir}", *OVERRIDES]
        assert main(args) == 0
        after = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
        unchanged = [name for name in markers if name != "setup.json"]
        assert {n: after[n] for n in unchanged} == {n: markers[n] for n in unchanged}
        metrics = lambda text: [{k: v for k, v in json.loads(l).items() if k != "wall_time_s"}  # noqa: E731
                                for l in text.splitlines() if '"setup"' not in l]
        assert metrics((run_dir / "metrics.jsonl").read_text()) == metrics(metrics_before)

        assert main(args + ["spin.beta=0.2", "spin.iterations=1"]) == 0
        after = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
        for name in ["sft.json", "anchor.json", "iter_0.generate.json", "iter_0.score.json"]:
            assert after[name] == markers[name], name
        for name in ["iter_0.train.json", "sft.eval.json"]:
            assert after[name] != markers[name], name
        stages = [json.loads(l)["stage"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert stages[-1] == "iter_0.eval" and not any(s.startswith("iter_1") for s in stages)
