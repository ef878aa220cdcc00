"""A tiny text tokenizer in the released file layout (tiny test checkpoints, demo, benchmarks).

`write_tiny_tokenizer` trains a deterministic byte-level BPE on a small built-in corpus and writes
`tiktoken.model`, `tokenizer_config.json` and `special_tokens_map.json` as the release does;
`kimia_jax.text.tokenizer.TextTokenizer` reads them like the real files.
"""

from __future__ import annotations

import base64
import collections
import json
import os
from collections.abc import Mapping
from pathlib import Path

import regex

from kimia_jax import fileio
from kimia_jax.text.tokenizer import (
    CONFIG_FILE,
    PAT_STR,
    SPECIAL_TOKENS_MAP_FILE,
    VOCAB_FILE,
    reference_special_names,
)

_TINY_CORPUS = """\
Please transcribe the following audio clip word by word.
Please transcribe the following audio. The quick brown fox jumps over the lazy dog.
What is the speaker saying? Describe the sound, the music and the emotion of the speaker.
Kimi-Audio is an open-source audio foundation model for understanding, generation and conversation.
It handles speech recognition, audio question answering, captioning and speech conversation.
Convert the following text to speech, then answer the question in a friendly voice, please.
Numbers 0 1 2 3 4 5 6 7 8 9 and 2024-05-25, 12.5 Hz, 16 kHz, 24 kHz; "quotes" (brackets) [x] {y}!
请将音频内容转换为文字。这段音频的说话人是什么情绪？请把以下的文本转换成语音。你好，世界！
Bonjour à tous, ¿qué tal? Grüße aus München. Привет, мир. こんにちは世界。안녕하세요.
"""


# The tiny LLM fixture's msg_end sits at base + 5 (see write_tiny_tokenizer).
FIXTURE_MOVED_SPECIALS = {"<|im_msg_end|>": 5}


def _train_byte_bpe(corpus: str, num_tokens: int) -> dict[bytes, int]:
    """Deterministic byte-level BPE: 256 single bytes, then the most frequent pair merges.

    Pairs are merged within pre-tokens of `PAT_STR` (as tiktoken encodes); ties break on the
    smaller byte string so the output never depends on hash order.
    """
    if num_tokens < 256:
        raise ValueError(f"num_base_tokens={num_tokens}: a byte-level BPE needs at least 256")
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(regex.findall(PAT_STR, corpus))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    while len(ranks) < num_tokens:
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for w, count in words.items():
            parts = seqs[w]
            for a, b in zip(parts, parts[1:], strict=False):
                if a + b not in ranks:
                    pairs[a, b] += count
        if not pairs:
            raise ValueError(
                f"corpus too small for num_base_tokens={num_tokens} (stopped at {len(ranks)})"
            )
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0][0] + kv[0][1]))
        ranks[a + b] = len(ranks)
        for w, parts in seqs.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            seqs[w] = merged
    return ranks


def write_tiny_tokenizer(
    out_dir: str | os.PathLike[str],
    num_base_tokens: int = 600,
    num_special_tokens: int = 80,
    corpus: str | None = None,
    moved_specials: Mapping[str, int] | None = None,
) -> Path:
    """Writes a tiny tokenizer in the released file layout; returns `out_dir`.

    Files: `tiktoken.model` (byte-level BPE with exactly `num_base_tokens` ranks, trained on a
    small built-in multilingual corpus), `tokenizer_config.json` (HF-style, `added_tokens_decoder`
    listing every special id, `auto_map` to the hub class) and `special_tokens_map.json`.

    The special block is the reference 421-name list truncated to `num_special_tokens` entries
    (`reference_special_names`): the 34 named/reserved entries keep their 7B offsets (msg_end +2,
    media_begin +18, media_end +20, blank +23, text_eos +24, kimia_user_msg_start +27,
    kimia_assistant_msg_start +28, ct +32, ctd +33) and the reserved tail is cut, so the last
    entry (`<|reserved_token_{num_special_tokens - 15}|>`) is still the pad token. With the
    defaults this matches the tiny LLM fixture's config.json: specials 600..679, pad 679, text
    vocabulary 680 (= `kimia_text_output_vocab`).

    One adaptation, `moved_specials` (name -> offset; default `{"<|im_msg_end|>": 5}`): the named
    token is swapped with whatever sits at that offset. The tiny LLM fixture was built with
    msg_end = 605 = base + 5 (its config's eos_token_id), not base + 2 as in the 7B list
    (151645), so the default swaps `<|im_msg_end|>` with `<|reserved_token_0|>`. Pass `{}` for
    the plain truncation.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = _train_byte_bpe(_TINY_CORPUS if corpus is None else corpus, num_base_tokens)
    names = reference_special_names(num_special_tokens)
    for name, offset in (
        FIXTURE_MOVED_SPECIALS if moved_specials is None else moved_specials
    ).items():
        if name not in names or not 0 <= offset < len(names):
            raise ValueError(f"moved_specials: cannot move {name!r} to offset {offset}")
        i = names.index(name)
        names[i], names[offset] = names[offset], names[i]
    lines = [
        base64.b64encode(tok).decode("ascii") + f" {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    fileio.write_bytes(out_dir / VOCAB_FILE, ("\n".join(lines) + "\n").encode("ascii"))

    def added(content: str) -> dict[str, object]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    config = {
        "added_tokens_decoder": {str(num_base_tokens + i): added(n) for i, n in enumerate(names)},
        "auto_map": {"AutoTokenizer": ["tokenization_kimia.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": names[-1],
        "unk_token": names[-2],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
    }
    fileio.write_bytes(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    special_map = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": names[-1],
        "unk_token": names[-2],
    }
    fileio.write_bytes(
        out_dir / SPECIAL_TOKENS_MAP_FILE, (json.dumps(special_map, indent=2) + "\n").encode()
    )
    return out_dir
