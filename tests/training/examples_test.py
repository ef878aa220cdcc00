"""Layouts of every SFT and pre-training task (training.md §3.3/§3.4 and §4.3-§4.5 tables), loss
flags included, written as the fixtures README writes them: `audio|text`, `×n` runs, flags C
(continuous), LA / LT (the position's own id is an audio / text target)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimia_jax.errors import PromptError
from kimia_jax.training import examples as ex_lib
from kimia_jax.training.examples import (
    ExampleDropped,
    PretrainExampleBuilder,
    Segment,
    Truncation,
)
from tests.training import helpers as h

US, AS, B, TEOS, MEND, MB, ME, CT, CTD = 627, 628, 623, 624, 605, 618, 620, 632, 633
NAMES = {US: "us", AS: "as", B: "b", TEOS: "teos", MEND: "mend", MB: "mb", ME: "me", CT: "ct"}
NAMES[CTD] = "ctd"


def render(ex: ex_lib.Example) -> str:
    def name(i: int) -> str:
        return "c" if i >= h.OFFSET else NAMES.get(int(i), "t")

    cells = []
    for t in range(len(ex)):
        flags = [
            f
            for f, on in (
                ("C", ex.is_continuous[t]),
                ("LA", ex.audio_flags[t]),
                ("LT", ex.text_flags[t]),
            )
            if on
        ]
        cell = f"{name(ex.audio_ids[t])}|{name(ex.text_ids[t])}"
        cells.append(cell + (f"({','.join(flags)})" if flags else ""))
    out, i = [], 0
    while i < len(cells):
        j = i
        while j < len(cells) and cells[j] == cells[i]:
            j += 1
        out.append(cells[i] + (f"×{j - i}" if j - i > 1 else ""))
        i = j
    return ", ".join(out)


def wav(tokens: int, seed: int = 0) -> np.ndarray:
    """A waveform giving exactly `tokens` feature rows (ceil(L / 1280) per 30 s window)."""
    n = 1280 * (tokens - 1) + 17 if tokens <= 375 else 480000 + 1280 * (tokens - 376) + 5
    return np.random.default_rng(seed).uniform(-0.3, 0.3, n).astype(np.float32)


def codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, h.NUM_CODES, n)


def user_audio(n: int, wav_seed: int, code_seed: int) -> dict:
    """A user audio message of n tokens with precomputed (offset) audio_tokens."""
    return {
        "role": "user",
        "message_type": "audio",
        "content": wav(n, wav_seed),
        "audio_tokens": codes(n, code_seed) + h.OFFSET,
    }


def speech_reply(text: str, n: int, code_seed: int) -> dict:
    """An assistant speech turn (text + n codes, laid out as a delayed target)."""
    return {
        "role": "assistant",
        "message_type": "audio-text",
        "content": (None, text),
        "audio_tokens": codes(n, code_seed) + h.OFFSET,
    }


def ids(text: str) -> int:
    return len(h.tokenizer().encode(text))


def test_fixture_layouts_as_in_the_readme():
    """The four official layouts, exactly as the fixtures README tables spell them."""
    want = {
        0: "us|b, b|t×9, mb|b, c|b(C)×146, me|b, ct|b, mend|b, as|b, b|t(LT)×27, b|teos(LT), "
        "mend|b",
        3: "us|b, b|t×42, mend|b, as|b, b|t(LT)×27, b|teos(LT), mb|b, c|b(C,LA)×146, me|b(LA), "
        "ctd|b, mend|b",
    }
    for i, layout in want.items():
        assert render(h.builder().official(h.records()[i], h.TRAIN_FIX)) == layout


def test_understanding_text_instruction():
    b = h.builder()
    instr, ans = "Please transcribe the spoken content.", "hello world"
    m, k = ids(instr), ids(ans)
    for task in ("asr", "aqa", "aac", "ser", "sec", "asc"):
        ex = b.understanding(task, wav(7), ans, instruction=instr, codes=codes(7))
        assert ex.task == task
        assert render(ex) == (
            f"us|b, b|t×{m}, mb|b, c|b(C)×7, me|b, ct|b, mend|b, as|b, b|t(LT)×{k}, b|teos(LT), "
            "mend|b"
        )


def test_understanding_audio_instruction():
    """Audio instruction: a second continuous block before the content audio, one ct (§4.3)."""
    ex = h.builder().understanding(
        "aqa",
        wav(5),
        "yes",
        instruction_audio=wav(3, 1),
        codes=codes(5),
        instruction_codes=codes(3),
    )
    k = ids("yes")
    assert render(ex) == (
        "us|b, mb|b, c|b(C)×3, me|b, mb|b, c|b(C)×5, me|b, ct|b, mend|b, as|b, "
        + (f"b|t(LT)×{k}" if k > 1 else "b|t(LT)")
        + ", b|teos(LT), mend|b"
    )
    assert ex.spans == ((2, 3), (7, 5))
    assert [len(a) for a in ex.audios] == [len(wav(3)), len(wav(5))]


def test_audio_chat_multi_turn_loss_on_every_assistant_turn():
    ex = h.builder().audio_chat([(wav(4), codes(4), "hi there"), (wav(6, 2), codes(6), "ok")])
    a, c = ids("hi there"), ids("ok")
    t1 = f"b|t(LT)×{a}" if a > 1 else "b|t(LT)"
    t2 = f"b|t(LT)×{c}" if c > 1 else "b|t(LT)"
    assert render(ex) == (
        f"us|b, mb|b, c|b(C)×4, me|b, ct|b, mend|b, as|b, {t1}, b|teos(LT), mend|b, "
        f"us|b, mb|b, c|b(C)×6, me|b, ct|b, mend|b, as|b, {t2}, b|teos(LT), mend|b"
    )


def test_speech_conversation_delayed_parallel_layout():
    """§4.4: after `as`, 6 audio blanks while text runs, codes with LA, `mend` (LA) last; text ids +
    teos with LT; no continuous features on the assistant's speech; output type both (ctd)."""
    reply = "the quick brown fox jumps over the lazy dog"
    n, m = ids(reply), 30
    assert n + 1 <= m + 6
    ex = h.builder().speech_chat([(wav(5), codes(5), reply, codes(m, 3))])
    start = 2 + 5 + 1 + 2 + 1  # us, mb, 5 codes, me, ctd, mend, as
    assert render(ex)[: len("us|b, mb|b, c|b(C)×5, me|b, ctd|b, mend|b, as|b")] == (
        "us|b, mb|b, c|b(C)×5, me|b, ctd|b, mend|b, as|b"
    )
    a, t = ex.audio_ids[start:], ex.text_ids[start:]
    assert len(a) == m + 7
    np.testing.assert_array_equal(a[:6], B)
    np.testing.assert_array_equal(a[6 : 6 + m], codes(m, 3) + h.OFFSET)
    assert a[-1] == MEND
    np.testing.assert_array_equal(t[:n], h.tokenizer().encode(reply))
    assert t[n] == TEOS and (t[n + 1 :] == B).all()
    np.testing.assert_array_equal(ex.audio_flags[start:], [False] * 6 + [True] * (m + 1))
    np.testing.assert_array_equal(ex.text_flags[start:], [True] * (n + 1) + [False] * (m + 6 - n))
    assert not ex.is_continuous[start:].any()
    assert ex.audio_ids[start - 3] == CTD


def test_speech_turn_text_longer_than_audio_puts_mend_last():
    reply = "the quick brown fox jumps over the lazy dog"
    n = ids(reply)
    ex = h.builder().speech_chat([(wav(2), codes(2), reply, codes(2, 3))])
    a = ex.audio_ids[-(n + 1) :]
    assert len(ex) == 2 + 2 + 1 + 2 + 1 + (n + 1)
    np.testing.assert_array_equal(a[6:8], codes(2, 3) + h.OFFSET)
    assert a[-1] == MEND and (a[8:-1] == B).all()
    assert ex.audio_flags[-1] and ex.text_flags[-1]  # mend (LA) and teos (LT) share the last row


def test_tts_layout():
    text = "hello world"
    n = ids(text)
    ex = h.builder().tts(
        text, codes(9), instruction="Please convert the following text to speech. "
    )
    m = ids("Please convert the following text to speech. hello world")
    assert n == 6  # teos shares row 6 with the first code (§4.4 table: r_1 with y_7 / teos)
    assert render(ex) == (
        f"us|b, b|t×{m}, mend|b, as|b, b|t(LT)×6, c|teos(LA,LT), c|b(LA)×8, mend|b(LA)"
    )
    assert not ex.spans


def test_three_audio_clips_multi_turn_user_and_assistant():
    """Three clips (the official code asserts from two on): two user audios and an assistant
    speech turn; every continuous span gets its own clip, gathered in order."""
    b = h.builder()
    msgs = [
        user_audio(4, 1, 0),
        {"role": "assistant", "message_type": "text", "content": "ok"},
        user_audio(380, 2, 1),
        user_audio(3, 3, 2),
        speech_reply("hi", 8, 4),
    ]
    ex = b.conversation(msgs, "both", task="s2s")
    assert [n for _, n in ex.spans] == [4, 380, 3]
    assert ex.num_windows == 1 + 2 + 1
    row = ex_lib.row_arrays([ex], len(ex) + 5, 4, h.PAD)
    src = row["cont_src"]
    (s0, _), (s1, _), (s2, _) = ex.spans
    np.testing.assert_array_equal(src[s0 : s0 + 4], [0, 1, 2, 3])  # window 0
    np.testing.assert_array_equal(src[s1 : s1 + 375], 375 + np.arange(375))  # window 1
    np.testing.assert_array_equal(src[s1 + 375 : s1 + 380], 2 * 375 + np.arange(5))  # window 2
    np.testing.assert_array_equal(src[s2 : s2 + 3], 3 * 375 + np.arange(3))  # window 3
    np.testing.assert_array_equal(row["whisper_keep"], [16, 1500, 20, 12])
    assert (row["whisper_wav"][1] == wav(380, 2)[:480000]).all()
    # ct/ctd only after the last user audio of a turn
    assert (ex.audio_ids == CTD).sum() == 2


def test_official_schema_checks():
    b = h.builder()
    rec = json.loads(json.dumps(h.records()[0]))
    rec["conversation"][1]["audio_tokens"] = rec["conversation"][1]["audio_tokens"][:-3]
    with pytest.raises(PromptError, match="Whisper feature rows"):
        b.official(rec, h.TRAIN_FIX)
    rec = json.loads(json.dumps(h.records()[0]))
    rec["conversation"][1]["audio_tokens"] = [
        c - h.OFFSET for c in rec["conversation"][1]["audio_tokens"]
    ]
    with pytest.raises(PromptError, match="must already include kimia_token_offset"):
        b.official(rec, h.TRAIN_FIX)
    with pytest.raises(PromptError, match="lacks 'task_type'"):
        b.official({"conversation": []})
    with pytest.raises(PromptError, match="audio_tokens_fn"):
        rec = json.loads(json.dumps(h.records()[0]))
        del rec["conversation"][1]["audio_tokens"]
        b.official(rec, h.TRAIN_FIX)


def test_our_own_record_schema():
    b = h.builder()
    HELLO = h.tokenizer().encode("hello world")  # noqa: N806
    rec = {
        "task": "s2s",
        "output_type": "both",
        "messages": [
            {"role": "user", "kind": "audio", "audio": wav(5), "codes": codes(5)},
            {"role": "assistant", "kind": "audio_text", "text": "ok", "codes": codes(9, 1)},
            {"role": "user", "kind": "text", "text": "hello world", "text_ids": HELLO},
            {"role": "assistant", "kind": "text", "text": "ok", "loss": False},
        ],
    }  # fmt: skip
    ex = b.record(rec)
    assert ex.task == "s2s" and ex.spans == ((2, 5),)
    last = ex.text_flags[-(ids("ok") + 2) :]
    assert not last.any()  # the history turn with loss off
    assert ex.audio_flags.sum() == 10 and ex.text_flags.sum() == ids("ok") + 1
    rec["messages"][2]["text_ids"] = [1, 2, 3]
    with pytest.raises(PromptError, match="text_ids differ"):
        b.record(rec)


def test_truncation_counts_what_is_cut():
    tr = Truncation(max_length=100)
    b = h.builder(tr)
    ex = b.official(h.records()[0], h.TRAIN_FIX)  # 190 positions
    assert len(ex) == 100 and ex.cut == 90
    assert tr.truncated == 1 and tr.positions_cut == 90 and tr.text_targets_cut == 28
    lab = ex.labels(h.PAD)
    assert lab["text_labels"][-1] == h.PAD and not lab["text_loss_mask"][-1]
    assert ex.spans == ((11, 89),)  # the span is cut with the row
    assert "1 truncated (90 positions, 28 text and 0 audio targets cut)" in tr.summary()
    with pytest.raises(ExampleDropped):
        h.builder(Truncation(max_length=100, policy="drop")).official(h.records()[0], h.TRAIN_FIX)
    with pytest.raises(PromptError, match="max_length 100"):
        h.builder(Truncation(max_length=100, policy="error")).official(h.records()[0], h.TRAIN_FIX)


# ---------------------------------------------------------------------------------------------
# pre-training (§3.3 blocks, §3.4 tasks)


def _pt(max_length=None) -> PretrainExampleBuilder:
    return PretrainExampleBuilder(
        h.tokenizer().extra_tokens,
        kimia_token_offset=h.OFFSET,
        truncation=Truncation(max_length=max_length),
    )


def _segs() -> list[Segment]:
    return [Segment(codes(3 + i, i), np.array([10 + i, 11 + i]), wav(3 + i, i)) for i in range(4)]


PRETRAIN_LAYOUTS = {
    "audio_only": "mb|b, c|b(LA)×3, me|b(LA), mb|b, c|b(LA)×4, me|b(LA), mb|b, c|b(LA)×5, "
    "me|b(LA), mb|b, c|b(LA)×6, me|b(LA)",
    "asr": "mb|b, c|b(C)×3, me|b, b|t(LT)×2, b|teos(LT), mb|b, c|b(C)×4, me|b, b|t(LT)×2, "
    "b|teos(LT), mb|b, c|b(C)×5, me|b, b|t(LT)×2, b|teos(LT), mb|b, c|b(C)×6, me|b, b|t(LT)×2, "
    "b|teos(LT)",
    "tts": "b|t×2, b|teos, mb|b, c|b(LA)×3, me|b(LA), b|t×2, b|teos, mb|b, c|b(LA)×4, me|b(LA), "
    "b|t×2, b|teos, mb|b, c|b(LA)×5, me|b(LA), b|t×2, b|teos, mb|b, c|b(LA)×6, me|b(LA)",
    "audio_to_semantic": "mb|b, c|b(C)×3, me|b, mb|b, c|b(LA)×4, me|b(LA), mb|b, c|b(C)×5, me|b, "
    "mb|b, c|b(LA)×6, me|b(LA)",
    "audio_to_text": "mb|b, c|b(C)×3, me|b, b|t(LT)×2, b|teos(LT), mb|b, c|b(C)×5, me|b, "
    "b|t(LT)×2, b|teos(LT)",
    # ADT(2): text t t teos b..., audio 6 b, 4 codes, me (right after the codes)
    "audio_to_semantic_text": "mb|b, c|b(C)×3, me|b, b|t(LT)×2, b|teos(LT), b|b×3, c|b(LA)×4, "
    "me|b(LA), mb|b, c|b(C)×5, me|b, b|t(LT)×2, b|teos(LT), b|b×3, c|b(LA)×6, me|b(LA)",
}


@pytest.mark.parametrize("task", sorted(PRETRAIN_LAYOUTS))
def test_pretrain_layouts(task):
    ex = _pt().build(task, _segs())
    assert render(ex) == PRETRAIN_LAYOUTS[task]
    assert ex.task == task
    assert len(ex.audios) == len(ex.spans) == ex.is_continuous.any() * render(ex).count("(C)")


def test_pretrain_text_only():
    ex = _pt().text_only([5, 6, 7, 8])
    assert render(ex) == "b|t(LT)×4"
    lab = ex.labels(h.PAD)
    np.testing.assert_array_equal(lab["text_loss_mask"], [True, True, True, False])
    assert not lab["audio_loss_mask"].any()


def test_pretrain_adds_segments_while_they_fit():
    tr = Truncation(max_length=20)
    ex = PretrainExampleBuilder(
        h.tokenizer().extra_tokens, kimia_token_offset=h.OFFSET, truncation=tr
    ).build("asr", _segs())
    assert len(ex) == 17 and tr.segments_unused == 2 and tr.truncated == 0  # 8 + 9; +10 > 20
    with pytest.raises(PromptError, match="needs the segment's waveform"):
        _pt().build("asr", [Segment(codes(3), np.array([1]), None)])
    with pytest.raises(PromptError, match="transcript"):
        _pt().build("audio_to_text", [_segs()[0], Segment(codes(3), None, None)])


def test_pack_first_fit_rows():
    b = h.builder()
    exs = [
        b.understanding("asr", wav(n, n), "ok", instruction="hi", codes=codes(n))
        for n in (30, 12, 3)
    ]
    assert [len(e) for e in exs] == [41, 23, 14]
    assert ex_lib.pack(exs, 60, 4, 8) == [[0, 2], [1]]  # the third goes back to the first row
    assert ex_lib.pack(exs, 60, 1, 8) == [[0], [1], [2]]  # one window per row
    assert ex_lib.pack(exs, 60, 4, 1) == [[0], [1], [2]]  # one example per row
    batch = ex_lib.batch_of(exs, 60, 4, h.PAD)
    seg = batch["segment_ids"][0]
    n0, n2 = len(exs[0]), len(exs[2])
    np.testing.assert_array_equal(seg[: n0 + n2], [1] * n0 + [2] * n2)
    assert (seg[n0 + n2 :] == 0).all()
    np.testing.assert_array_equal(batch["positions"][0, n0 : n0 + n2], np.arange(n2))
    assert not batch["text_loss_mask"][0, n0 - 1] and not batch["audio_loss_mask"][0, n0 - 1]
    assert batch["text_labels"][0, n0 - 1] == h.PAD
    # the second example's continuous rows read window 1 of the row
    c2 = np.nonzero(batch["is_continuous"][0, n0 : n0 + n2])[0] + n0
    np.testing.assert_array_equal(batch["cont_src"][0, c2], 375 + np.arange(3))
    with pytest.raises(PromptError, match="more than a row"):
        ex_lib.pack(exs, 20, 2, 8)
