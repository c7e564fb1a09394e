"""The tokenizer a GGUF file describes, checked against the file itself.

A GGUF file carries no tokenizer.json: it stores the vocabulary, the merges, the token types and the name of a
pre-tokenizer (`tokenizer.ggml.pre`), and llama.cpp knows the rules each name stands for. transformers' GGUF reader
rebuilds a `tokenizers` tokenizer from these; for a byte-level BPE vocabulary whose pre-tokenizer it does not know
it falls back to GPT-2's single regex. `smollm` (SmolLM/SmolLM2, and StarCoder-style vocabularies) is one: llama.cpp
and the model's original tokenizer.json split every digit off first, so "a  1" is `a ĠĠ 1` there but `a Ġ Ġ 1` after
transformers' conversion (GPT-2's regex keeps the space before the digit in the digit's piece).

This module holds
- `ReferenceTokenizer`: an encoder built only from the file's `tokenizer.ggml.*` fields (read with the `gguf`
  package) and llama.cpp's rules for its pre-tokenizer, independent of transformers' conversion:
  1. control and user-defined tokens (token types 3 and 4) are cut out of the text whole, longest first;
  2. every other span goes through the pre-tokenizer's regexes in order (llama.cpp's `llm_tokenizer_bpe`); each
     regex splits every piece the previous one left into its matches and the text between them;
  3. each piece's UTF-8 bytes are spelled in GPT-2's byte alphabet, one symbol per byte, and the adjacent pair
     with the lowest merge rank is merged until no pair has a rank; each final symbol is a token of the vocabulary.
- `fix_pre_tokenizer`: the pre-tokenizer the original tokenizer.json of such a vocabulary has (for `smollm`:
  `Digits(individual_digits=True)` then `ByteLevel`), set on the converted tokenizer;
- `check_tokenizer`: the converted tokenizer must encode every probe exactly as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from frugal_spin.errors import UserError

# llama.cpp's regexes (src/llama-vocab.cpp, `llm_tokenizer_bpe`), by the `tokenizer.ggml.pre` names it maps to them
# (`llama_vocab::impl::load`). Only the byte-level BPE families whose rules are reproduced and tested here. GPT-2's
# own regex ends in `|\s+`; llama.cpp's copy does not need it, since text no alternative matches stays a piece.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
DIGIT_SPLIT = r"\p{N}"
SMOLLM_FAMILY = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
GPT2_FAMILY = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(SMOLLM_FAMILY, (DIGIT_SPLIT, GPT2_SPLIT)),
    **dict.fromkeys(GPT2_FAMILY, (GPT2_SPLIT,)),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types that are matched whole in the text

# Text the converted tokenizer must encode exactly as the reference does: digits after runs of spaces (the case
# transformers' GGUF conversion gets wrong), numbers, tabs and newlines, contractions, accents, CJK, emoji, a
# no-break space, and a chat turn with its special tokens.
PROBE_TEXTS = (
    "a  1",
    "x  42  y   7",
    "Hello world! 123 and 4,567.89 or 3rd",
    "  multiple   spaces\tand\ttabs  ",
    "line one\nline two\n\n\nend\r\nwindows\n  indented 2\n",
    "It's, they're, we'll, I'd, you've, I'm",
    "Café déjà vu, naïve façade, Ångström, Straße",
    "東京は日本の首都です。人口は1400万人。",
    "emoji 🙂👍🏽 and flags 🇫🇷 ok",
    "no\u00a0break\u00a0space 2\u00a05",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n 4 <|im_end|>",
)


@dataclass(frozen=True)
class GgufVocab:
    """The `tokenizer.ggml.*` fields of a GGUF file."""

    model: str  # "gpt2" for byte-level BPE
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    add_bos: bool
    bos_id: int | None
    add_eos: bool = False
    eos_id: int | None = None


def read_vocab(gguf_path: Path) -> GgufVocab:
    """The tokenizer fields of `gguf_path`, read with the gguf package (not through transformers)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens", [])
    return GgufVocab(model=value("tokenizer.ggml.model", ""), pre=value("tokenizer.ggml.pre"),
                     tokens=tuple(tokens), token_types=tuple(value("tokenizer.ggml.token_type", [1] * len(tokens))),
                     merges=tuple(value("tokenizer.ggml.merges", [])),
                     add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
                     bos_id=value("tokenizer.ggml.bos_token_id"),
                     add_eos=bool(value("tokenizer.ggml.add_eos_token", False)),
                     eos_id=value("tokenizer.ggml.eos_token_id"))


def unsupported_reason(vocab: GgufVocab) -> str | None:
    """Why the reference cannot encode for this vocabulary (None when it can)."""
    if vocab.model != "gpt2":
        return f"tokenizer.ggml.model {vocab.model!r} is not byte-level BPE"
    if vocab.pre not in PRE_TOKENIZER_SPLITS:
        return f"tokenizer.ggml.pre {vocab.pre!r} has no reference rules here"
    if not vocab.merges:
        return "the file lists no merges"
    return None


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's spelling of each byte as one printable character: bytes that are printable Latin-1 characters
    ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 take the code points 256, 257, ...
    in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return tuple(spelling[b] for b in range(256))


class ReferenceTokenizer:
    """Encodes text as llama.cpp does for a byte-level BPE GGUF vocabulary (see the module docstring)."""

    def __init__(self, vocab: GgufVocab):
        import regex  # \p{L} and \p{N}, which `re` lacks; transformers depends on it, so it is always installed

        reason = unsupported_reason(vocab)
        if reason is not None:
            raise ValueError(reason)
        self.vocab = vocab
        self.ids = {token: i for i, token in enumerate(vocab.tokens)}
        # A merge is "left right"; byte-level symbols never hold a plain space, so one split is exact.
        self.ranks = {tuple(merge.split(" ", 1)): rank for rank, merge in enumerate(vocab.merges)}
        self.splits = [regex.compile(pattern) for pattern in PRE_TOKENIZER_SPLITS[vocab.pre]]
        whole = sorted((t for t, kind in zip(vocab.tokens, vocab.token_types) if kind in (CONTROL, USER_DEFINED) and t),
                       key=len, reverse=True)
        self.special = regex.compile("|".join(regex.escape(t) for t in whole)) if whole else None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special`, BOS first and EOS last where the file asks for them
        (`tokenizer.ggml.add_bos_token`, `add_eos_token`)."""
        vocab = self.vocab
        ids = [vocab.bos_id] if add_special and vocab.add_bos and vocab.bos_id is not None else []
        for span, is_special in self._special_spans(text):
            if is_special:
                ids.append(self.ids[span])
            else:
                for piece in self.pre_tokenize(span):
                    ids.extend(self.ids[symbol] for symbol in self.bpe(piece))
        if add_special and vocab.add_eos and vocab.eos_id is not None:
            ids.append(vocab.eos_id)
        return ids

    def _special_spans(self, text: str):
        start = 0
        for match in (self.special.finditer(text) if self.special else ()):
            if match.start() > start:
                yield text[start:match.start()], False
            yield match.group(), True
            start = match.end()
        if start < len(text):
            yield text[start:], False

    def pre_tokenize(self, text: str) -> list[str]:
        """llama.cpp's `unicode_regex_split`: each regex in turn splits every piece into its matches and the
        (kept) text between them."""
        pieces = [text]
        for pattern in self.splits:
            split = []
            for piece in pieces:
                start = 0
                for match in pattern.finditer(piece):
                    if match.start() > start:
                        split.append(piece[start:match.start()])
                    if match.end() > match.start():
                        split.append(match.group())
                    start = match.end()
                if start < len(piece):
                    split.append(piece[start:])
            pieces = split
        return pieces

    def bpe(self, piece: str) -> list[str]:
        """The piece's bytes as byte-alphabet symbols, merged lowest rank first (leftmost first among equal
        ranks) until no adjacent pair is a merge."""
        alphabet = byte_alphabet()
        symbols = [alphabet[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(self.ranks.get(pair, -1), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
            ranked = [(rank, i) for rank, i in ranked if rank >= 0]
            if not ranked:
                break
            _, i = min(ranked)
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols


def fixed_pre_tokenizer(pre: str | None):
    """The pre-tokenizer of the original tokenizer.json for the vocabularies transformers' GGUF reader maps to
    GPT-2's (None where its mapping is right or unknown): SmolLM2's and StarCoder's tokenizer.json put
    `Digits(individual_digits=True)` before the byte-level step."""
    from tokenizers import pre_tokenizers

    if pre in SMOLLM_FAMILY:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                 use_regex=True)])
    return None


def fix_pre_tokenizer(tokenizer, vocab: GgufVocab) -> bool:
    """Set the right pre-tokenizer on a tokenizer transformers built from this GGUF; True if it changed."""
    fixed = fixed_pre_tokenizer(vocab.pre) if vocab.model == "gpt2" else None
    if fixed is None:
        return False
    tokenizer.backend_tokenizer.pre_tokenizer = fixed
    return True


def check_tokenizer(tokenizer, reference: ReferenceTokenizer, what: str, gguf_path: Path,
                    texts: tuple[str, ...] = PROBE_TEXTS) -> int:
    """Every probe text must encode to the reference's ids (special tokens and BOS as the file says); else one
    error line naming the text and the first token where they part. Returns the number of texts checked."""
    for text in texts:
        got = list(tokenizer(text)["input_ids"])
        want = reference.encode(text)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            tokens = reference.vocab.tokens
            shown = lambda ids: " ".join(tokens[i] if 0 <= i < len(tokens) else f"<id {i}>"  # noqa: E731
                                         for i in ids[at:at + 4])
            raise UserError(f"{what}: the tokenizer converted from {gguf_path} encodes {text!r} differently from "
                            f"the GGUF's own vocabulary and {reference.vocab.pre!r} pre-tokenizer rules (token {at}: "
                            f"{shown(got)!r} instead of {shown(want)!r}); not cached")
    return len(texts)
