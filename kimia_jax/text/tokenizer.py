"""Kimi-Audio text tokenizer: tiktoken BPE ranks + the Kimi special-token block (llm.md §1.3, §7).

Twin of the hub class `tokenization_kimia.TikTokenTokenizer` (loaded by the official code with
`AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)`), without transformers:

* `tiktoken.model`: one `base64(token_bytes) rank` per line; `num_base_tokens` = number of lines.
* Specials: the reference builds a hard-coded list of 421 names (34 named/reserved entries, then
  `<|reserved_token_20|>` ... `<|reserved_token_406|>`) and registers them at ids
  `num_base_tokens + position`. The last entry is the pad token, the one before it the unk token.
* `encode(s)` = `encode(s, bos=False, eos=False)` of the reference (what the prompt builder calls):
  special strings inside `s` are encoded as plain text, the input is cut into <= 400k-character
  pieces and further so that no run of whitespace / non-whitespace exceeds 25k characters.
* `decode(ids)` = `tiktoken.Encoding.decode` (UTF-8 with replacement; specials decode to names).

Where the special ids come from: `tokenizer_config.json`'s `added_tokens_decoder` when it holds the
whole contiguous special block `[num_base_tokens, num_base_tokens + n)` (what a HF save writes,
and what `testing.tokenizer.write_tiny_tokenizer` writes for the tiny test checkpoints, whose
block is a truncation of the 7B list); otherwise the reference's hard-coded 421-name list, which
every entry the config does list must agree with. Named ids are then looked up by name
(`ExtraTokens`), never recomputed from `num_base_tokens`.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from kimia_jax.configs import layout
from kimia_jax.errors import TokenizerFileError  # noqa: F401 (re-export)

VOCAB_FILE = layout.TEXT_VOCAB
CONFIG_FILE = layout.TEXT_TOKENIZER_CONFIG
SPECIAL_TOKENS_MAP_FILE = layout.TEXT_SPECIAL_TOKENS_MAP

# Qwen2 pre-tokenisation pattern, verbatim from tokenization_kimia.py (single digits: \p{N}).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 293 + 128  # `num_reserved_special_tokens` of the reference class
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken panics above this (reference comment)
MAX_NO_WHITESPACES_CHARS = 25_000  # openai/tiktoken#195: long runs blow the regex stack

# The first 34 entries of the reference list (tokenization_kimia.py `used_special_tokens`).
# Position = id - num_base_tokens. The inline comments of special_tokens.py are NOT these positions.
_USED_SPECIAL_TOKENS = (
    "[BOS]",
    "[EOS]",
    "<|im_msg_end|>",
    "<|im_user_msg_start|>",
    "<|im_assistant_msg_start|>",
    "<|reserved_token_0|>",
    "<|reserved_token_1|>",
    "<|reserved_token_2|>",
    "<|reserved_token_3|>",
    "[EOT]",
    "<|reserved_token_4|>",
    "<|reserved_token_5|>",
    "<|reserved_token_6|>",
    "<|reserved_token_7|>",
    "<|reserved_token_8|>",
    "<|reserved_token_9|>",
    "<|reserved_token_10|>",
    "<|reserved_token_11|>",
    "<|im_media_begin|>",
    "<|reserved_token_12|>",
    "<|im_media_end|>",
    "<|reserved_token_13|>",
    "<|reserved_token_14|>",
    "<|im_kimia_text_blank|>",
    "<|im_kimia_text_eos|>",
    "<|reserved_token_15|>",
    "<|reserved_token_16|>",
    "<|im_kimia_user_msg_start|>",
    "<|im_kimia_assistant_msg_start|>",
    "<|reserved_token_17|>",
    "<|reserved_token_18|>",
    "<|reserved_token_19|>",
    "<|im_kimia_speech_ct_id|>",
    "<|im_kimia_speech_ctd_id|>",
)

# ExtraTokens field -> special-token name (kimia_infer/utils/special_tokens.py).
EXTRA_TOKEN_NAMES = {
    "msg_end": "<|im_msg_end|>",
    "user_msg_start": "<|im_user_msg_start|>",
    "assistant_msg_start": "<|im_assistant_msg_start|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "kimia_text_blank": "<|im_kimia_text_blank|>",
    "kimia_text_eos": "<|im_kimia_text_eos|>",
    "kimia_user_msg_start": "<|im_kimia_user_msg_start|>",
    "kimia_assistant_msg_start": "<|im_kimia_assistant_msg_start|>",
    "kimia_speech_ct_id": "<|im_kimia_speech_ct_id|>",
    "kimia_speech_ctd_id": "<|im_kimia_speech_ctd_id|>",
}


def reference_special_names(num_special: int = NUM_SPECIAL_TOKENS) -> list[str]:
    """The reference special-token list, truncated/extended to `num_special` entries.

    With 421 entries this is exactly `tokenization_kimia.py`'s list; with fewer, the reserved tail
    is cut (`<|reserved_token_20|>` ... `<|reserved_token_{num_special - 15}|>`), which is what
    the reference class computes when `num_reserved_special_tokens = num_special`. The last
    entry is the pad token either way.
    """
    if num_special < len(_USED_SPECIAL_TOKENS) + 2:
        raise ValueError(
            f"num_special={num_special}: need at least {len(_USED_SPECIAL_TOKENS) + 2} specials "
            "(the 34 named/reserved entries plus unk and pad)"
        )
    tail = [
        f"<|reserved_token_{i}|>" for i in range(20, num_special - len(_USED_SPECIAL_TOKENS) + 20)
    ]
    return list(_USED_SPECIAL_TOKENS) + tail


@dataclasses.dataclass(frozen=True)
class ExtraTokens:
    """Named special ids (kimia_infer/utils/special_tokens.py `ExtraTokens`), read by name."""

    msg_end: int
    user_msg_start: int
    assistant_msg_start: int
    media_begin: int
    media_end: int
    kimia_text_blank: int
    kimia_text_eos: int
    kimia_user_msg_start: int
    kimia_assistant_msg_start: int
    kimia_speech_ct_id: int
    kimia_speech_ctd_id: int
    pad: int

    @classmethod
    def from_special_tokens(cls, special_tokens: Mapping[str, int], pad_id: int) -> ExtraTokens:
        missing = [name for name in EXTRA_TOKEN_NAMES.values() if name not in special_tokens]
        if missing:
            raise TokenizerFileError(f"special tokens lack {missing}")
        ids = {field: int(special_tokens[name]) for field, name in EXTRA_TOKEN_NAMES.items()}
        return cls(**ids, pad=int(pad_id))


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Reads a tiktoken BPE file (`base64 rank` per line) with errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(f"{path}: tiktoken vocabulary file not found")
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFileError(
                    f"{path}:{lineno}: expected 'base64_token rank', got {raw[:80]!r}"
                )
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise TokenizerFileError(f"{path}:{lineno}: cannot parse {raw[:80]!r}: {e}") from e
            if token in ranks:
                raise TokenizerFileError(f"{path}:{lineno}: token {token!r} appears twice")
            if rank in seen_ranks:
                raise TokenizerFileError(f"{path}:{lineno}: rank {rank} appears twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise TokenizerFileError(f"{path}: empty vocabulary")
    if seen_ranks != set(range(len(ranks))):
        raise TokenizerFileError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _special_tokens_from_config(
    config: Mapping[str, object], num_base_tokens: int, config_path: Path
) -> dict[str, int]:
    """Special name -> id, from `added_tokens_decoder` or the reference list (module docstring)."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerFileError(f"{config_path}: added_tokens_decoder is not a mapping")
    listed: dict[int, str] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, Mapping) else entry
        try:
            token_id = int(key)
        except ValueError as e:
            raise TokenizerFileError(f"{config_path}: added_tokens_decoder key {key!r}") from e
        if not isinstance(content, str) or not content:
            raise TokenizerFileError(f"{config_path}: added token {key} has no string content")
        listed[token_id] = content
    block = range(num_base_tokens, num_base_tokens + len(listed))
    if listed and set(listed) == set(block):
        names = [listed[i] for i in block]
    else:
        names = reference_special_names()
        for token_id, content in sorted(listed.items()):
            pos = token_id - num_base_tokens
            if not 0 <= pos < len(names) or names[pos] != content:
                want = names[pos] if 0 <= pos < len(names) else "nothing (outside the block)"
                raise TokenizerFileError(
                    f"{config_path}: added token {token_id} is {content!r}, but the reference "
                    f"special list has {want!r} there (num_base_tokens={num_base_tokens})"
                )
    if len(set(names)) != len(names):
        dup = [n for n, c in collections.Counter(names).items() if c > 1]
        raise TokenizerFileError(f"{config_path}: duplicate special tokens {dup}")
    return {name: num_base_tokens + i for i, name in enumerate(names)}


class TextTokenizer:
    """tiktoken-based Kimi-Audio text tokenizer (twin of `tokenization_kimia.TikTokenTokenizer`).

    Attributes:
        num_base_tokens: number of BPE ranks in `tiktoken.model`.
        special_tokens: special name -> id (ids `num_base_tokens + position`).
        vocab_size: num_base_tokens + number of specials (= `kimia_text_output_vocab`).
        bos_id, eos_id, pad_id, unk_id: as the reference (`unk_id` returns the pad id, as there).
        extra_tokens: the named ids used by the prompt builder and the generation loop.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        special_names: Sequence[str],
        *,
        name: str = "kimia",
    ) -> None:
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {s: self.num_base_tokens + i for i, s in enumerate(special_names)}
        self.model = tiktoken.Encoding(
            name=name,
            pat_str=PAT_STR,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=self.special_tokens,
        )
        self.vocab_size = self.model.n_vocab
        self.bos_id = self.special_tokens["[BOS]"]
        self.eos_id = self.special_tokens["[EOS]"]
        self.pad_id = self.special_tokens[special_names[-1]]
        self.unk_id = self.pad_id  # reference quirk: unk_id is looked up with the pad token
        self.extra_tokens = ExtraTokens.from_special_tokens(self.special_tokens, self.pad_id)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> TextTokenizer:
        """Loads `<model_dir>/tiktoken.model` (+ `tokenizer_config.json` when present)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerFileError(f"{model_dir}: not a directory")
        ranks = load_tiktoken_ranks(model_dir / VOCAB_FILE)
        config_path = model_dir / CONFIG_FILE
        config: dict[str, object] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerFileError(f"{config_path}: invalid JSON: {e}") from e
        specials = _special_tokens_from_config(config, len(ranks), config_path)
        names = sorted(specials, key=specials.__getitem__)
        return cls(ranks, names, name=str(model_dir / VOCAB_FILE))

    def encode(self, s: str) -> list[int]:
        """Reference `encode(s, bos=False, eos=False)`: special strings are encoded as text."""
        if type(s) is not str:  # the reference asserts `type(s) is str`
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        ids: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_whitespaces_or_nonwhitespaces(
                s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
            ):
                ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """tiktoken decode: token bytes concatenated, UTF-8 with replacement characters."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"decode: ids {bad[:8]} outside the text vocabulary [0, {self.vocab_size})"
            )
        return self.model.decode(ids)


def split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Cuts `s` so that no piece has more than `max_len` consecutive (non-)whitespace characters.

    Same cut points as the reference `_split_whitespaces_or_nonwhitespaces` (also for "", which
    yields one empty piece).
    """
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start = i
                run_len = 1
    yield s[start:]
