"""TextTokenizer vs the reference `tokenization_kimia.TikTokenTokenizer`, and the tiny tokenizer.

The reference class (hub file of moonshotai/Kimi-Audio-7B-Instruct, read from a copy in the public
code index; llm.md §7) needs transformers' remote code and a network download, so
`_ReferenceTikTokenTokenizer` below re-creates its behaviour from tiktoken directly, statement for
statement: `load_tiktoken_bpe`, the hard-coded 421-entry special list registered at
`num_base_tokens + position`, `encode(s, bos, eos, allowed_special=set(), disallowed_special=())`
with the 400k / 25k splitting, and `decode = tiktoken decode`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from kimia_jax.testing.tokenizer import write_tiny_tokenizer
from kimia_jax.text import tokenizer as tt

FIXTURE_CONFIG = Path(__file__).parents[1] / "fixtures" / "prompt" / "llm_config.json"


class _ReferenceTikTokenTokenizer:
    """Behavioural copy of tokenization_kimia.py's TikTokenTokenizer (see module docstring)."""

    num_reserved_special_tokens = 293 + 128
    pat_str = (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
        "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    )

    def __init__(self, vocab_file: str, num_reserved_special_tokens: int | None = None):
        n_special = num_reserved_special_tokens or self.num_reserved_special_tokens
        mergeable_ranks = load_tiktoken_bpe(vocab_file)
        num_base_tokens = len(mergeable_ranks)
        used = (
            ["[BOS]", "[EOS]", "<|im_msg_end|>", "<|im_user_msg_start|>"]
            + ["<|im_assistant_msg_start|>"]
            + [f"<|reserved_token_{i}|>" for i in range(4)]
            + ["[EOT]"]
            + [f"<|reserved_token_{i}|>" for i in range(4, 12)]
            + ["<|im_media_begin|>", "<|reserved_token_12|>", "<|im_media_end|>"]
            + ["<|reserved_token_13|>", "<|reserved_token_14|>"]
            + ["<|im_kimia_text_blank|>", "<|im_kimia_text_eos|>"]
            + ["<|reserved_token_15|>", "<|reserved_token_16|>"]
            + ["<|im_kimia_user_msg_start|>", "<|im_kimia_assistant_msg_start|>"]
            + [f"<|reserved_token_{i}|>" for i in range(17, 20)]
            + ["<|im_kimia_speech_ct_id|>", "<|im_kimia_speech_ctd_id|>"]
        )
        autoset = [f"<|reserved_token_{i}|>" for i in range(20, n_special - len(used) + 20)]
        special_tokens = used + autoset
        self.special_tokens = {t: num_base_tokens + i for i, t in enumerate(special_tokens)}
        self.model = tiktoken.Encoding(
            name=Path(vocab_file).name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["[BOS]"]
        self.eos_id = self.special_tokens["[EOS]"]
        self.pad_id = self.special_tokens[special_tokens[-1]]
        self.unk_id = self.special_tokens[special_tokens[-1]]  # reference bug: pad token

    def encode(self, s, *, bos, eos, allowed_special=frozenset(), disallowed_special=()):
        assert type(s) is str
        substrs = (
            substr
            for i in range(0, len(s), 400_000)
            for substr in self._split_whitespaces_or_nonwhitespaces(s[i : i + 400_000], 25_000)
        )
        t = []
        for substr in substrs:
            t.extend(
                self.model.encode(
                    substr, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
            )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t):
        return self.model.decode(list(t))

    @staticmethod
    def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
        current_slice_len = 0
        current_slice_is_space = s[0].isspace() if len(s) > 0 else False
        slice_start = 0
        for i in range(len(s)):
            is_now_space = s[i].isspace()
            if current_slice_is_space ^ is_now_space:
                current_slice_len = 1
                current_slice_is_space = is_now_space
            else:
                current_slice_len += 1
                if current_slice_len > max_len:
                    yield s[slice_start:i]
                    slice_start = i
                    current_slice_len = 1
        yield s[slice_start:]


SAMPLES = [
    "",
    " ",
    "Please transcribe the following audio clip word by word.",
    "请将音频内容转换为文字。",
    "Grüße, ¿qué tal? Привет 😀👍🏽 e\u0301 \u200b zero-width",
    "The year 2024 had 366 days; pi ~ 3.14159.\n\n  indented\r\n\ttab\n",
    "special strings stay text: <|im_kimia_text_blank|><|im_msg_end|>[BOS][EOS]<|endoftext|>",
    "I'm sure you'll see they've DON'T it's",
    "a" * 300 + " " * 50 + "\n" * 7,
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> tt.TextTokenizer:
    return tt.TextTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # load_tiktoken_bpe caches by path otherwise


def test_tiny_special_ids_match_the_llm_fixture(tiny):
    cfg = json.loads(FIXTURE_CONFIG.read_text())
    e = tiny.extra_tokens
    assert tiny.num_base_tokens == cfg["num_base_tokens"] == 600
    assert tiny.vocab_size == cfg["kimia_text_output_vocab"] == cfg["kimia_token_offset"] == 680
    assert e.media_begin == cfg["kimia_media_begin"] == 618
    assert e.media_end == cfg["kimia_media_end"] == 620
    assert e.pad == tiny.pad_id == tiny.unk_id == cfg["pad_token_id"] == 679
    assert tiny.bos_id == cfg["bos_token_id"] == 600
    assert e.msg_end == cfg["eos_token_id"] == 605  # fixture README: msg_end 605
    # fixture README: blank 623, text_eos 624, user 627, assistant 628, ct 632, ctd 633
    assert (e.kimia_text_blank, e.kimia_text_eos) == (623, 624)
    assert (e.kimia_user_msg_start, e.kimia_assistant_msg_start) == (627, 628)
    assert (e.kimia_speech_ct_id, e.kimia_speech_ctd_id) == (632, 633)


def test_tiny_files_are_the_released_layout(tiny_dir):
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == ["special_tokens_map.json", "tiktoken.model", "tokenizer_config.json"]
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_kimia.TikTokenTokenizer"
    ids = sorted(int(k) for k in cfg["added_tokens_decoder"])
    assert ids == list(range(600, 680))
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 600 and all(len(line.split()) == 2 for line in lines)


def test_tiny_specials_are_the_reference_list_truncated(tiny):
    names = sorted(tiny.special_tokens, key=tiny.special_tokens.get)
    ref = tt.reference_special_names(80)
    # The one adaptation: msg_end swapped with <|reserved_token_0|> (offsets 2 <-> 5).
    ref[2], ref[5] = ref[5], ref[2]
    assert names == ref
    assert names[-1] == "<|reserved_token_65|>"


def test_encode_decode_match_reference_on_tiny_vocab(tiny_dir, tiny):
    ref = _ReferenceTikTokenTokenizer(str(tiny_dir / "tiktoken.model"), 80)
    for s in SAMPLES:
        ids = tiny.encode(s)
        assert ids == ref.encode(s, bos=False, eos=False), s
        assert tiny.decode(ids) == ref.decode(ids) == s  # byte-level BPE: lossless round trip
    # special strings are text, never special ids
    ids = tiny.encode("<|im_kimia_text_blank|>")
    assert all(i < tiny.num_base_tokens for i in ids) and len(ids) > 1


def test_decode_specials_and_broken_utf8_like_reference(tiny_dir, tiny):
    ref = _ReferenceTikTokenTokenizer(str(tiny_dir / "tiktoken.model"), 80)
    e = tiny.extra_tokens
    snowman = tiny.encode("☃")  # 3 UTF-8 bytes
    cases = [
        [e.kimia_text_blank, *tiny.encode("hi"), e.kimia_text_eos, e.pad],
        snowman[:1] + tiny.encode(" ok"),  # cut multi-byte char -> U+FFFD
        list(range(256)),
        [],
    ]
    for ids in cases:
        assert tiny.decode(ids) == ref.decode(ids)
    assert tiny.decode([e.kimia_text_blank]) == "<|im_kimia_text_blank|>"
    with pytest.raises(ValueError, match=r"outside the text vocabulary \[0, 680\)"):
        tiny.decode([680])


def test_long_inputs_are_split_like_reference(tiny_dir, tiny):
    ref = _ReferenceTikTokenTokenizer(str(tiny_dir / "tiktoken.model"), 80)
    s = "x" * 26_000 + " " * 25_001 + "word " * 10 + "y" * 50_001
    ids = tiny.encode(s)
    assert ids == ref.encode(s, bos=False, eos=False)
    assert tiny.decode(ids) == s
    for text, n in [("", 3), ("ab  cd", 1), ("aaaa    b", 2), (" " * 7 + "z" * 7, 3)]:
        got = list(tt.split_whitespaces_or_nonwhitespaces(text, n))
        assert got == list(ref._split_whitespaces_or_nonwhitespaces(text, n))
        assert "".join(got) == text


def test_full_421_specials_without_config_match_reference(tmp_path, tiny_dir):
    # A released-layout folder with only tiktoken.model: the reference list decides (7B offsets).
    (tmp_path / "tiktoken.model").write_bytes((tiny_dir / "tiktoken.model").read_bytes())
    tok = tt.TextTokenizer.from_pretrained(tmp_path)
    ref = _ReferenceTikTokenTokenizer(str(tmp_path / "tiktoken.model"))
    assert tok.special_tokens == ref.special_tokens
    assert tok.vocab_size == ref.n_words == 600 + 421
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
        ref.bos_id,
        ref.eos_id,
        ref.pad_id,
        ref.unk_id,
    )
    e = tok.extra_tokens
    base = 600
    offsets = {
        "msg_end": 2,
        "user_msg_start": 3,
        "assistant_msg_start": 4,
        "media_begin": 18,
        "media_end": 20,
        "kimia_text_blank": 23,
        "kimia_text_eos": 24,
        "kimia_user_msg_start": 27,
        "kimia_assistant_msg_start": 28,
        "kimia_speech_ct_id": 32,
        "kimia_speech_ctd_id": 33,
        "pad": 420,
    }
    assert {k: getattr(e, k) - base for k in offsets} == offsets  # llm.md §1.3 table
    s = SAMPLES[4] + SAMPLES[6]
    assert tok.encode(s) == ref.encode(s, bos=False, eos=False)


def test_partial_added_tokens_decoder_is_checked_against_reference(tmp_path, tiny_dir):
    (tmp_path / "tiktoken.model").write_bytes((tiny_dir / "tiktoken.model").read_bytes())
    cfg = {"added_tokens_decoder": {"600": {"content": "[BOS]"}, "623": "<|im_kimia_text_blank|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tt.TextTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 1021 and tok.extra_tokens.kimia_text_blank == 623
    cfg["added_tokens_decoder"]["624"] = {"content": "<|im_kimia_text_blank|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        tt.TokenizerFileError,
        match=r"added token 624 is '<\|im_kimia_text_blank\|>', but the reference special list "
        r"has '<\|im_kimia_text_eos\|>' there",
    ):
        tt.TextTokenizer.from_pretrained(tmp_path)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(tt.TokenizerFileError, match="tiktoken vocabulary file not found"):
        tt.TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 1\nnot-base64!! 2\n")
    with pytest.raises(tt.TokenizerFileError, match=r"tiktoken.model:3: cannot parse"):
        tt.TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(tt.TokenizerFileError, match=r"ranks are not exactly 0\.\.1"):
        tt.TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0 extra\n")
    with pytest.raises(
        tt.TokenizerFileError, match=r"tiktoken.model:1: expected 'base64_token rank'"
    ):
        tt.TextTokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_str(tiny):
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        tiny.encode(b"abc")
