"""End-of-turn tokens (issue #11, defects 5, 6 and 9): the opponent samples with the recipe's settings only, real
and generated answers end at the template's end-of-turn token, and a pair with one cut answer scores no end token.

The chat tokenizers are built offline: a small byte-level BPE trained here, with the special tokens and the chat
template of Phi-3, Llama-3, ChatML (Qwen-style, eos `<|endoftext|>`; and SmolLM2-style, eos = pad = `<|im_end|>`)
and Gemma copied from their hub tokenizer_config.json files.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from frugal_spin.config import DataConfig
from frugal_spin.data import Example, encode_example, encode_examples
from frugal_spin.generate import generate_answers, strip_answer
from frugal_spin.turns import cut_after_first, end_of_turn_id, scored_pair, stop_token_ids, truncation_counts

PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

STYLES = {  # name: (template, special tokens, eos, pad, bos, the end-of-turn token)
    "phi3": (PHI3, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|endoftext|>",
             "<|endoftext|>", None, "<|end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|end_of_text|>", None, "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>", None,
               "<|im_end|>"),
    "smollm2": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_end|>", None,
                "<|im_end|>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<pad>", "<bos>",
              "<end_of_turn>"),
}


def chat_tokenizer(style: str):
    """A local tokenizer in the given model family's style. The special tokens are registered as the hub files
    register them (added tokens marked special, most of them not in `additional_special_tokens`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos, pad, bos, _ = STYLES[style]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["what is two plus two", "the answer is four", "hello there, how are you"] * 20,
                            trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, bos_token=bos)
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:  # Llama-3 ships none; model.load_tokenizer makes it eos, as here
        tokenizer.pad_token = eos
    return tokenizer


@pytest.mark.parametrize("style", sorted(STYLES))
def test_end_of_turn_is_read_off_the_template(style):
    tokenizer = chat_tokenizer(style)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == STYLES[style][-1]


def test_end_of_turn_of_the_built_in_base_is_its_eos():
    from frugal_spin.tiny_base import TinyBaseSpec, build_tokenizer

    tokenizer = build_tokenizer(TinyBaseSpec())
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id


@pytest.mark.parametrize("style", sorted(STYLES))
def test_real_answers_end_with_the_end_of_turn_token(style):
    """Phi-3 appends `<|end|>\\n<|endoftext|>`, Gemma `<end_of_turn>\\n`: cut at eos the real answer kept the
    turn token and what follows it (or, with no eos, never ended at all)."""
    tokenizer = chat_tokenizer(style)
    end = tokenizer.convert_tokens_to_ids(STYLES[style][-1])
    counts = Counter()
    encoded = encode_example(tokenizer, Example("what is two plus two", "the answer is four"),
                             DataConfig(max_answer_tokens=200), counts)
    assert encoded.answer_ids[-1] == end and encoded.answer_ids.count(end) == 1
    assert tokenizer.decode(encoded.answer_ids, skip_special_tokens=True).strip() == "the answer is four"
    assert counts["answers_without_end_of_turn"] == 0


def test_real_answers_without_the_end_of_turn_token_are_warned_about(capsys):
    """A template whose assistant turns end without any special token: the fallback (eos) is not in the real
    answers, which is counted and said once."""
    tokenizer = chat_tokenizer("chatml")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    counts = Counter()
    examples = [Example("what is two plus two", "the answer is four")] * 3
    encode_examples(tokenizer, examples, DataConfig(max_answer_tokens=200), counts)
    assert counts["answers_without_end_of_turn"] == 3
    err = capsys.readouterr().err
    assert "3 of 3 real answers do not end with" in err and "<|endoftext|>" in err
    # A truncated answer lacks it by design (counted as truncated_answers), not because of the template.
    counts = Counter()
    encode_example(chat_tokenizer("chatml"), examples[0], DataConfig(max_answer_tokens=2), counts)
    assert counts == Counter({"truncated_answers": 1})


@pytest.mark.parametrize("style,config_eos", [("phi3", [32000, 7]), ("llama3", None), ("gemma", 1)])
def test_generation_stops_on_the_turn_token_and_every_configured_eos(style, config_eos):
    from transformers import GenerationConfig

    tokenizer = chat_tokenizer(style)
    end = tokenizer.convert_tokens_to_ids(STYLES[style][-1])
    ids = stop_token_ids(tokenizer, GenerationConfig(eos_token_id=config_eos))
    expected = [end, *([] if config_eos is None else config_eos if isinstance(config_eos, list) else [config_eos])]
    assert ids[: len(expected)] == expected and tokenizer.eos_token_id in ids and len(set(ids)) == len(ids)


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM whose `generate` writes a fixed continuation; records what it was asked."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.calls = []
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig(eos_token_id=99)

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        tail = torch.tensor([self.continuation] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize("style", ["phi3", "llama3", "gemma"])
def test_generated_answers_are_cut_at_the_end_of_turn_not_at_eos(style):
    """A model that writes `a b <turn end> c <eos>` (Phi-3 `<|end|>`, Llama-3 `<|eot_id|>`): the answer is
    `a b <turn end>`, and generate is told to stop at the turn token and at the generation_config's eos ids, not
    at the tokenizer's eos alone."""
    tokenizer = chat_tokenizer(style)
    end, eos = tokenizer.convert_tokens_to_ids([STYLES[style][-1], tokenizer.eos_token])
    a, b, c = tokenizer("the answer", add_special_tokens=False)["input_ids"][:1] * 3
    model = ScriptedModel([a, b, end, c, eos, eos])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_dict=False)
    (answer,) = generate_answers(model, tokenizer, [prompt], max_new_tokens=6, batch_size=1)
    assert answer == [a, b, end]
    (call,) = model.calls
    config = call.get("generation_config")
    stops = config.eos_token_id if config is not None else call.get("eos_token_id")
    assert end in stops and 99 in stops and eos in stops


def test_strip_answer_with_pad_equal_to_the_stop_token():
    """SmolLM2: pad = eos = `<|im_end|>`; the answer keeps exactly one and loses the padding after it."""
    assert strip_answer([5, 6, 2, 2, 2], [2], pad_id=2) == [5, 6, 2]
    assert strip_answer([5, 6, 0, 0], [2], pad_id=0) == [5, 6]
    assert cut_after_first([5, 3, 6, 2], [2, 3]) == [5, 3]


# ------------------------------------------------------------------------------------ defect 5: sampling settings


def _leaky_model():
    """The built-in base's shape with random weights, carrying a generation_config that would change every
    score (Qwen2.5-Instruct ships repetition_penalty 1.1, top_k 20, temperature 0.7), under a peft wrapper as in
    a run."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    from frugal_spin.tiny_base import TinyBaseSpec, build_model, build_tokenizer

    spec = TinyBaseSpec(num_layers=1, hidden_size=64, intermediate_size=128)
    tokenizer = build_tokenizer(spec)
    torch.manual_seed(0)
    base = build_model(spec, tokenizer)
    base.generation_config = GenerationConfig(
        repetition_penalty=1.8, no_repeat_ngram_size=1, top_k=3, top_p=0.5, temperature=0.7, do_sample=True,
        min_new_tokens=4, suppress_tokens=[5, 6], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    return model.eval(), tokenizer


def _recording_generate(model, seen: list):
    """Wrap `model.generate` to also return its raw logits and its processed scores (what sampling draws
    from) for every step, whatever generate_answers passes."""
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs, return_dict_in_generate=True, output_scores=True, output_logits=True)
        seen.append((torch.stack(out.logits), torch.stack(out.scores)))
        return out.sequences

    model.generate = generate


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_only_the_recipe_decides_how_tokens_are_drawn(temperature):
    """The processed scores equal raw logits / temperature (raw logits for greedy evaluation): no repetition
    penalty, n-gram ban, top-k/top-p or suppressed token of the model's generation_config reaches them."""
    model, tokenizer = _leaky_model()
    seen = []
    _recording_generate(model, seen)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{i} + {i}"}],
                                             add_generation_prompt=True, return_dict=False) for i in range(3)]
    generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, temperature=temperature, seed=1)
    (logits, scores), = seen
    expected = logits / temperature if temperature > 0 else logits
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    assert model.get_base_model().generation_config.repetition_penalty == 1.8  # set aside, then put back


# ------------------------------------------------------------------------------- defect 9: truncation asymmetry


def test_scored_pair_leaves_the_end_token_out_when_one_side_was_cut():
    end = 2
    assert scored_pair([4, 5, end], [6, 7, end], [end]) == ([4, 5, end], [6, 7, end])  # both end
    assert scored_pair([4, 5], [6, 7], [end]) == ([4, 5], [6, 7])  # both cut
    assert scored_pair([4, 5], [6, 7, end], [end]) == ([4, 5], [6, 7])  # real cut at max_answer_tokens
    assert scored_pair([4, 5, end], [6, 7], [end]) == ([4, 5], [6, 7])  # generated cut at max_new_tokens
    assert scored_pair([4, 5, 9], [6, 9], [end, 9]) == ([4, 5, 9], [6, 9])  # any stop id ends a turn
    rows = [{"real_ids": r, "generated_ids": g} for r, g in
            [([4, end], [5, end]), ([4], [5, end]), ([4, end], [5]), ([4], [5])]]
    assert truncation_counts(rows, [end]) == {"pairs_real_truncated": 2, "pairs_generated_truncated": 2,
                                              "pairs_end_token_left_out": 2}
