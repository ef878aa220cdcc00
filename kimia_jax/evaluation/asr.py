"""ASR scoring exactly as Kimi-Audio-Evalkit's `qwen2-audio-impl` (spec/evaluation.md section 2).

Per subset: drop rows whose prediction reads `"null"`; `remove_sp` both sides; language normaliser
(en: Whisper English then Basic; zh: speechio TextNorm, every option off; yue: zhconv zh-cn then
Basic; other: Basic); sacreBLEU 1.5.1's `zh` tokenizer; drop all-punctuation tokens; lowercase;
split; `editdistance` on token lists; WER = round(100 * sum(distances) / sum(ref lengths), 2).

Libraries: `whisper-normalizer` (identical to the Evalkit's copy), `zhconv`, `editdistance`; the
speechio normaliser is vendored (`cn_tn.py`). sacreBLEU 1.5.1 is not a dependency: its `zh`
tokenizer (a char-range test + the 13a regexes, about 30 lines) is re-implemented below and pinned
by the fixture tests.

Where the Evalkit crashes (an empty reference among the first five scored rows of a subset, a
subset with no scored row) we score what it scores from the sixth row on, or give `wer: None`,
and return a note line instead of raising (spec section 5).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import editdistance

from kimia_jax.evaluation.results import as_str, group_by_subset

# --- pre-clean -----------------------------------------------------------------------------

_PUNCS = "!,.?;:"


def remove_sp(text: str, lang: str | None) -> str:
    """Tags `<|...|>` -> space, whitespace runs -> one space, no space before `!,.?;:`, lstrip;
    zh: no whitespace at all."""
    t = re.sub(r"<\|.*?\|>", " ", text)
    t = re.sub(r"\s+", " ", t)
    t = re.sub(f" ?([{_PUNCS}])", r"\1", t)
    t = t.lstrip(" ")
    if lang == "zh":
        t = re.sub(r"\s+", "", t)
    return t


# --- normalisers ---------------------------------------------------------------------------


@functools.cache
def _normalizers() -> dict[str, Any]:
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    from kimia_jax.evaluation.cn_tn import TextNorm

    return {
        "english": EnglishTextNormalizer(),
        "basic": BasicTextNormalizer(),
        "chinese": TextNorm(),  # every option off, as the Evalkit builds it
    }


_FULLWIDTH_DIGITS = {0xFF10 + i: ord("0") + i for i in range(10)}


# --- sacreBLEU 1.5.1 `zh` tokenizer ----------------------------------------------------------

# sacreBLEU's range table, compared as *strings* like sacreBLEU does: its entries '\u20000' and
# '\u2f800' are two-character strings ('\u2000' + '0'), so a single character c matches them iff
# '\u2001' <= c <= '\u2a6d' and '\u2f81' <= c <= '\u2fa1' (e.g. the ellipsis U+2026 and the em
# dash U+2014 count as "Chinese" and become separate tokens). Kept as written to stay exact.
_ZH_RANGES = [
    ("\u3400", "\u4db5"),
    ("\u4e00", "\u9fa5"),
    ("\u9fa6", "\u9fbb"),
    ("\uf900", "\ufa2d"),
    ("\ufa30", "\ufa6a"),
    ("\ufa70", "\ufad9"),
    ("\u20000", "\u2a6d6"),
    ("\u2f800", "\u2fa1d"),
    ("\uff00", "\uffef"),
    ("\u2e80", "\u2eff"),
    ("\u3000", "\u303f"),
    ("\u31c0", "\u31ef"),
    ("\u2f00", "\u2fdf"),
    ("\u2ff0", "\u2fff"),
    ("\u3100", "\u312f"),
    ("\u31a0", "\u31bf"),
    ("\ufe10", "\ufe1f"),
    ("\ufe30", "\ufe4f"),
    ("\u2600", "\u26ff"),
    ("\u2700", "\u27bf"),
    ("\u3200", "\u32ff"),
    ("\u3300", "\u33ff"),
]

# mteval-v13a post-tokenizer regexes (sacreBLEU `TokenizerRegexp`), applied in order.
_RE_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
    (re.compile(r"\s+"), r" "),
]


def _is_chinese_char(c: str) -> bool:
    return any(start <= c <= end for start, end in _ZH_RANGES)


def tokenize_zh(line: str) -> str:
    """sacreBLEU 1.5.1 `TOKENIZERS['zh']`: CJK characters as single tokens, the rest 13a-split."""
    line = "".join(f" {c} " if _is_chinese_char(c) else c for c in line.strip())
    for pattern, repl in _RE_13A:
        line = pattern.sub(repl, line)
    return line.strip()


def remove_punctuation(sent: str) -> str:
    """Drops space-separated tokens made only of Unicode P* characters (the Evalkit's
    `EvaluationTokenizer.remove_punctuation`; an empty token is all-punctuation, so it goes)."""
    return " ".join(
        t for t in sent.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t)
    )


def normalize_stages(text: str, lang: str | None, *, strict: bool = False) -> dict[str, Any]:
    """Every stage of the Evalkit pipeline after the read, in order (names as in the fixtures)."""
    norm = _normalizers()
    stages: dict[str, Any] = {}
    t = remove_sp(text, lang)
    stages["remove_sp"] = t
    if lang == "yue":
        import zhconv

        t = zhconv.convert(t, "zh-cn")
        stages["zhconv_zh_cn"] = t
    if lang == "en":
        t = norm["english"](t)
        stages["english_normalizer"] = t
    if lang == "zh":
        if strict:
            t = t.translate(_FULLWIDTH_DIGITS)
        t = norm["chinese"](t)
        stages["chinese_normalizer"] = t
    else:
        t = norm["basic"](t)
        stages["basic_normalizer"] = t
    t = tokenize_zh(t)
    stages["sacrebleu_zh"] = t
    t = remove_punctuation(t)
    stages["punctuation_removed"] = t
    t = t.lower()
    stages["lowercased"] = t
    stages["tokens"] = t.split()
    return stages


def tokens(text: str, lang: str | None, *, strict: bool = False) -> list[str]:
    return normalize_stages(text, lang, strict=strict)["tokens"]


# --- scoring -------------------------------------------------------------------------------


@dataclasses.dataclass
class AsrScore:
    """Per-subset metrics `{subset: {"wer", "total"}}`, per-row edit distances (None = dropped),
    aligned with the input rows, and note lines for every difference from the Evalkit."""

    metrics: dict[Any, dict[str, Any]]
    details: list[int | None]
    notes: list[str]


def score_asr(
    rows: Sequence[Mapping[str, Any]], lang: str | None, *, dataset: str = "", strict: bool = False
) -> AsrScore:
    """Scores rows as read (`results.read_results`); subsets sorted, rows in file order."""
    position = {id(r): i for i, r in enumerate(rows)}
    details: list[int | None] = [None] * len(rows)
    metrics: dict[Any, dict[str, Any]] = {}
    notes: list[str] = []
    for subset, group in group_by_subset(rows).items():
        kept = [r for r in group if as_str(r["prediction"]) != "null"]
        distance = length = 0
        early_empty = 0
        for k, r in enumerate(kept):
            ref = tokens(as_str(r["answer"]), lang, strict=strict)
            hyp = tokens(as_str(r["prediction"]), lang, strict=strict)
            d = editdistance.eval(ref, hyp)
            distance += d
            length += len(ref)
            details[position[id(r)]] = d
            if k < 5 and not ref:
                early_empty += 1
        where = f"{dataset}/{subset}" if dataset else str(subset)
        if early_empty:
            notes.append(
                f"note: {where}: {early_empty} empty reference(s) among the first 5 scored rows "
                "scored like later ones (hypothesis tokens as errors) (Evalkit: IndexError in "
                "compute_wer, no score for the file)"
            )
        if length == 0:
            wer = None
            notes.append(
                f"note: {where}: no reference tokens to score ({len(kept)} scored rows), wer null "
                "(Evalkit: ZeroDivisionError, no score for the file)"
            )
        else:
            wer = round(distance / length * 100, 2)
        metrics[subset] = {"wer": wer, "total": len(kept)}
    return AsrScore(metrics, details, notes)
