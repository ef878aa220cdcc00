"""PromptBuilder vs the official prompt manager.

Expected sequences are written out by hand from the reference code:
* version "2607d51": MoonshotAI/Kimi-Audio commit 2607d515f5b7dffa1dcc7526f9f26feb48e356c4,
  kimia_infer/api/prompt_manager.py (`get_prompt`, `tokenize_message`) + kimia_infer/utils/data.py;
* version "349251e": the same file after PR #100 (commit 349251e1d8f4f98d58fda59246381faecd7392e0,
  read through its adaptation in vllm-project/vllm vllm/transformers_utils/processors/kimi_audio.py,
  "adapted from .../kimia_infer/api/prompt_manager.py"): assistant text gets `blank | text_eos`,
  "audio-text" messages, loss masks.
Each test says which version it follows. Ids are the tiny fixture's (fixtures/prompt/README.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kimia_jax.text.conversation import PromptBuilder, PromptError, batch
from kimia_jax.text.tokenizer import ExtraTokens

FIXTURES = Path(__file__).parents[1] / "fixtures" / "prompt"
OFFSET = 680
US, AS, B, TEOS, MB, ME, CT, CTD, MEND = 627, 628, 623, 624, 618, 620, 632, 633, 605
EXTRA = ExtraTokens(
    msg_end=MEND,
    user_msg_start=603,
    assistant_msg_start=604,
    media_begin=MB,
    media_end=ME,
    kimia_text_blank=B,
    kimia_text_eos=TEOS,
    kimia_user_msg_start=US,
    kimia_assistant_msg_start=AS,
    kimia_speech_ct_id=CT,
    kimia_speech_ctd_id=CTD,
    pad=679,
)
# The fixture's 9 synthetic text ids, one per word (fixtures README).
INSTRUCTION = "Please transcribe the following audio clip word by word."
WORD_IDS = dict(zip(INSTRUCTION.split(), [68, 149, 354, 296, 235, 548, 568, 191, 195], strict=True))
WORD_IDS.update({"hi": 11, "there": 12, "q": 13, "ok": 14, "go": 15, "a": 16, "b": 17, "c": 18})
FEAT_D = 96


def encode(text: str) -> list[int]:
    return [WORD_IDS[w] for w in text.split()]


class FakeAudio:
    """Injected audio callables: codes and features per audio key (a path or an array)."""

    def __init__(self, codes: dict[str, np.ndarray], extra_frames: int = 2):
        self.codes = codes
        self.extra_frames = extra_frames
        self.calls: list[str] = []

    @staticmethod
    def key(audio) -> str:
        return Path(audio).name if not isinstance(audio, np.ndarray) else f"arr{audio.size}"

    def tokens(self, audio) -> np.ndarray:
        self.calls.append(self.key(audio))
        return self.codes[self.key(audio)]

    def features(self, audio) -> np.ndarray:
        n = len(self.codes[self.key(audio)]) + self.extra_frames  # N' >= N: extra frames dropped
        seed = sum(map(ord, self.key(audio)))
        return np.random.default_rng(seed).normal(size=(n, FEAT_D)).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path) -> Path:
    for name in ["A.wav", "B.wav", "C.wav", "D.wav", "fixture.wav"]:
        (tmp_path / name).write_bytes(b"RIFF")  # only existence is checked; callables are fakes
    return tmp_path


@pytest.fixture(scope="module")
def trace():
    return np.load(FIXTURES / "llm_decode_trace.npz")


def make_builder(fake: FakeAudio, version="349251e", **kw) -> PromptBuilder:
    return PromptBuilder(
        EXTRA,
        encode,
        fake.tokens,
        fake.features,
        kimia_token_offset=OFFSET,
        num_audio_codes=48,
        version=version,
        **kw,
    )


def codes(*c: int) -> np.ndarray:
    return np.asarray(c, np.int64)


def tok_ids(*c: int) -> list[int]:
    return [x + OFFSET for x in c]


@pytest.mark.parametrize("version", ["2607d51", "349251e"])
def test_fixture_prompt_asr_text(version, trace, audio_dir):
    """[user text, user audio], output_type "text": the LLM fixture's prompt (both versions)."""
    fixture_codes = trace["audio_input_ids"][0][11:33] - OFFSET
    feat = trace["whisper_feature"][0]
    fake = FakeAudio({"fixture.wav": fixture_codes})
    builder = PromptBuilder(
        EXTRA,
        encode,
        fake.tokens,
        lambda a: np.concatenate([feat, np.ones((3, FEAT_D), np.float32)]),  # extra frames cut
        kimia_token_offset=OFFSET,
        version=version,
    )
    msgs = [
        {"role": "user", "message_type": "text", "content": INSTRUCTION},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "fixture.wav")},
    ]
    p = builder.build(msgs, output_type="text")
    np.testing.assert_array_equal(p.audio_ids, trace["audio_input_ids"][0])
    np.testing.assert_array_equal(p.text_ids, trace["text_input_ids"][0])
    np.testing.assert_array_equal(p.is_continuous, trace["is_continuous_mask"][0])
    assert len(p.features) == 1
    np.testing.assert_array_equal(p.features[0], feat)
    dense = p.dense_features()
    np.testing.assert_array_equal(dense[11:33], feat)
    assert not dense[:11].any() and not dense[33:].any()
    assert not p.audio_loss_mask.any() and not p.text_loss_mask.any()  # user-only prompt
    assert p.audio_ids.dtype == np.int32 and p.is_continuous.dtype == bool


@pytest.mark.parametrize("output_type,marker", [("both", CTD), ("text", CT)])
def test_speech_chat_single_audio(output_type, marker, audio_dir):
    """llm.md §5.4 speech conversation (both versions identical; run with 349251e)."""
    fake = FakeAudio({"A.wav": codes(1, 2, 3)})
    p = make_builder(fake).build(
        [{"role": "user", "message_type": "audio", "content": audio_dir / "A.wav"}], output_type
    )
    assert p.audio_ids.tolist() == [US, MB, *tok_ids(1, 2, 3), ME, marker, MEND, AS]
    assert p.text_ids.tolist() == [B] * 9
    assert p.is_continuous.tolist() == [False, False, True, True, True] + [False] * 4
    np.testing.assert_array_equal(p.features[0], fake.features(audio_dir / "A.wav")[:3])


def _multi_turn(audio_dir):
    return [
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")},
        {"role": "assistant", "message_type": "text", "content": "hi there"},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "B.wav")},
    ]


def test_multi_turn_assistant_text_2607d51(audio_dir):
    """2607d51: assistant text turn = [as|b], [b|t..], [mend|b] (no text_eos)."""
    fake = FakeAudio({"A.wav": codes(1, 2, 3), "B.wav": codes(4, 5)})
    p = make_builder(fake, version="2607d51").build(_multi_turn(audio_dir), "both")
    user_a = [US, MB, *tok_ids(1, 2, 3), ME, CTD, MEND]
    asst = [AS, B, B, MEND]
    user_b = [US, MB, *tok_ids(4, 5), ME, CTD, MEND]
    assert p.audio_ids.tolist() == user_a + asst + user_b + [AS]
    assert p.text_ids.tolist() == [B] * 8 + [B, 11, 12, B] + [B] * 7 + [B]
    assert np.flatnonzero(p.is_continuous).tolist() == [2, 3, 4, 14, 15]
    assert len(p.features) == 2 and not p.text_loss_mask.any()


def test_multi_turn_assistant_text_349251e(audio_dir):
    """349251e: assistant text turn = [as|b], [b|t..], [b|teos], [mend|b]; loss on t.. and teos."""
    fake = FakeAudio({"A.wav": codes(1, 2, 3), "B.wav": codes(4, 5)})
    p = make_builder(fake).build(_multi_turn(audio_dir), "both")
    user_a = [US, MB, *tok_ids(1, 2, 3), ME, CTD, MEND]
    asst = [AS, B, B, B, MEND]
    user_b = [US, MB, *tok_ids(4, 5), ME, CTD, MEND]
    assert p.audio_ids.tolist() == user_a + asst + user_b + [AS]
    assert p.text_ids.tolist() == [B] * 8 + [B, 11, 12, TEOS, B] + [B] * 7 + [B]
    assert np.flatnonzero(p.text_loss_mask).tolist() == [9, 10, 11]
    assert not p.audio_loss_mask.any()  # user audio: has_loss = role == "assistant"
    assert np.flatnonzero(p.is_continuous).tolist() == [2, 3, 4, 15, 16]


def test_assistant_audio_turn_and_text_turn_end_349251e(audio_dir):
    """349251e: a user text turn ends without ct; an assistant audio turn gets ct/ctd, features
    and audio loss on its codes and media_end."""
    fake = FakeAudio({"C.wav": codes(7, 8), "D.wav": codes(9)})
    msgs = [
        {"role": "user", "message_type": "text", "content": "q"},
        {"role": "assistant", "message_type": "audio", "content": str(audio_dir / "C.wav")},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "D.wav")},
    ]
    p = make_builder(fake).build(msgs, "text")
    assert p.audio_ids.tolist() == (
        [US, B, MEND]
        + [AS, MB, *tok_ids(7, 8), ME, CT, MEND]
        + [US, MB, *tok_ids(9), ME, CT, MEND]
        + [AS]
    )
    assert p.text_ids.tolist() == [B, 13] + [B] * 15
    assert np.flatnonzero(p.is_continuous).tolist() == [5, 6, 12]
    assert np.flatnonzero(p.audio_loss_mask).tolist() == [5, 6, 7]  # codes + media_end
    assert not p.text_loss_mask.any()
    assert [f.shape for f in p.features] == [(2, FEAT_D), (1, FEAT_D)]
    assert fake.calls == ["C.wav", "D.wav"]


def test_audio_text_message_349251e(audio_dir):
    """349251e "audio-text": audio = 6 blanks + codes (not continuous), text = ids + blanks."""
    fake = FakeAudio({"A.wav": codes(1, 2), "B.wav": codes(3, 4, 5), "C.wav": codes(6)})
    msgs = [
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")},
        {"role": "assistant", "message_type": "audio-text",
         "content": (str(audio_dir / "B.wav"), "ok go")},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "C.wav")},
    ]  # fmt: skip
    p = make_builder(fake).build(msgs, "both")
    user_a = [US, MB, *tok_ids(1, 2), ME, CTD, MEND]
    asst_audio = [AS] + [B] * 6 + tok_ids(3, 4, 5) + [MEND]
    asst_text = [B, 14, 15] + [B] * 7 + [B]
    user_c = [US, MB, *tok_ids(6), ME, CTD, MEND]
    assert p.audio_ids.tolist() == user_a + asst_audio + user_c + [AS]
    assert p.text_ids.tolist() == [B] * 7 + asst_text + [B] * 6 + [B]
    assert np.flatnonzero(p.is_continuous).tolist() == [2, 3, 20]  # only the user audio
    assert len(p.features) == 2
    assert not p.audio_loss_mask.any() and not p.text_loss_mask.any()  # official: no loss here
    # transcript longer than 6 + N codes: the official builder's pad count goes negative
    msgs[1] = {**msgs[1], "content": (str(audio_dir / "C.wav"), "a b c a b c a b")}
    with pytest.raises(PromptError, match=r"message 1: 'audio-text' transcript has 8 tokens"):
        make_builder(fake).build(msgs, "both")
    with pytest.raises(PromptError, match=r"unknown message_type 'audio-text' \(builder version"):
        make_builder(fake, version="2607d51").build(msgs, "both")


def test_consecutive_same_role_messages_share_a_turn(audio_dir):
    """Both versions: one role marker; ct/ctd and msg_end only after the turn's last message."""
    fake = FakeAudio({"A.wav": codes(1), "B.wav": codes(2)})
    msgs = [
        {"role": "user", "message_type": "text", "content": "a b"},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")},
        {"role": "user", "message_type": "audio", "content": str(audio_dir / "B.wav")},
    ]
    for version in ["2607d51", "349251e"]:
        p = make_builder(fake, version=version).build(msgs, "text")
        assert p.audio_ids.tolist() == (
            [US, B, B, MB, *tok_ids(1), ME, MB, *tok_ids(2), ME, CT, MEND, AS]
        )
        assert p.text_ids.tolist() == [B, 16, 17] + [B] * 9


def test_text_only_prompt_has_no_features(audio_dir):
    p = make_builder(FakeAudio({})).build(
        [{"role": "user", "message_type": "text", "content": "hi there"}], "text"
    )
    assert p.audio_ids.tolist() == [US, B, B, MEND, AS]
    assert p.text_ids.tolist() == [B, 11, 12, B, B]
    assert p.features == () and p.feature_dim is None
    assert p.dense_features(FEAT_D).shape == (5, FEAT_D)
    with pytest.raises(ValueError, match="prompt has no features; pass feature_dim"):
        p.dense_features()


def test_waveform_content_and_no_whisper(audio_dir):
    wav = np.zeros(1600, np.float32)
    fake = FakeAudio({"arr1600": codes(5, 6)})
    b = PromptBuilder(EXTRA, encode, fake.tokens, None, kimia_token_offset=OFFSET)
    p = b.build([{"role": "user", "message_type": "audio", "content": wav}], "both")
    assert p.audio_ids.tolist() == [US, MB, *tok_ids(5, 6), ME, CTD, MEND, AS]
    assert p.features == ()


@pytest.mark.parametrize(
    "msgs,err,match",
    [
        ([], PromptError, "messages is empty"),
        ({"role": "user"}, PromptError, "messages must be a list of dicts, got dict"),
        (["hello"], PromptError, "message 0: expected a dict, got str"),
        ([{"role": "user", "content": "x"}], PromptError,
         r"message 0: missing key\(s\) \['message_type'\]"),
        ([{"role": "system", "message_type": "text", "content": "x"}], PromptError,
         r"message 0: unknown role 'system' \(expected one of \('user', 'assistant'\)\)"),
        ([{"role": "user", "message_type": "image", "content": "x"}], PromptError,
         r"message 0: unknown message_type 'image'"),
        ([{"role": "user", "message_type": "text", "content": np.zeros(3)}], PromptError,
         r"message 0: text content must be a str, got ndarray \(audio belongs in an 'audio' "
         r"message\)"),
        ([{"role": "user", "message_type": "audio", "content": "/nonexistent/x.wav"}],
         FileNotFoundError, "message 0: audio file not found: /nonexistent/x.wav"),
        ([{"role": "user", "message_type": "audio", "content": np.zeros((2, 3), np.float32)}],
         PromptError,
         r"message 0: audio waveform must be a non-empty 1-D array, got shape \(2, 3\)"),
        ([{"role": "user", "message_type": "audio", "content": 3}], PromptError,
         "message 0: audio content must be a file path or a 1-D float array, got int"),
    ],
)  # fmt: skip
def test_bad_messages_raise_clear_errors(msgs, err, match):
    with pytest.raises(err, match=match):
        make_builder(FakeAudio({})).build(msgs, "text")


def test_bad_output_type_and_callable_results(audio_dir):
    msg = [{"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")}]
    with pytest.raises(ValueError, match=r"output_type must be one of \['text', 'both'\]"):
        make_builder(FakeAudio({"A.wav": codes(1)})).build(msg, "audio")
    with pytest.raises(PromptError, match=r"audio codes outside \[0, 48\): min 0, max 48"):
        make_builder(FakeAudio({"A.wav": codes(0, 48)})).build(msg, "text")
    with pytest.raises(PromptError, match="must return a non-empty 1-D integer array"):
        make_builder(FakeAudio({"A.wav": np.zeros(2, np.float32)})).build(msg, "text")
    with pytest.raises(PromptError, match="1 whisper feature frames for 3 audio tokens"):
        make_builder(FakeAudio({"A.wav": codes(1, 2, 3)}, extra_frames=-2)).build(msg, "text")


def test_batch_padding(audio_dir):
    fake = FakeAudio({"A.wav": codes(1, 2, 3), "B.wav": codes(4)})
    builder = make_builder(fake)
    p1 = builder.build(
        [{"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")}], "both"
    )
    p2 = builder.build(
        [{"role": "user", "message_type": "text", "content": "a"},
         {"role": "user", "message_type": "audio", "content": str(audio_dir / "B.wav")}], "both"
    )  # fmt: skip
    p3 = builder.build([{"role": "user", "message_type": "text", "content": "q"}], "both")
    lens = [len(p1), len(p2), len(p3)]
    assert lens == [9, 8, 4]
    rb = batch([p1, p2, p3], pad_to=12, pad_id=EXTRA.pad)
    assert rb.lengths.tolist() == lens and rb.audio_ids.shape == (3, 12)
    assert rb.features.shape == (3, 12, FEAT_D)
    for i, p in enumerate([p1, p2, p3]):
        n = lens[i]
        np.testing.assert_array_equal(rb.audio_ids[i, :n], p.audio_ids)
        np.testing.assert_array_equal(rb.text_ids[i, :n], p.text_ids)
        assert (rb.audio_ids[i, n:] == EXTRA.pad).all() and (rb.text_ids[i, n:] == EXTRA.pad).all()
        assert rb.valid[i].tolist() == [True] * n + [False] * (12 - n)
        assert rb.positions[i, :n].tolist() == list(range(n)) and not rb.positions[i, n:].any()
        np.testing.assert_array_equal(rb.features[i, :n], p.dense_features(FEAT_D))
        assert not rb.features[i, n:].any() and not rb.is_continuous[i, n:].any()
    lb = batch([p1, p2, p3], padding="left")
    assert lb.audio_ids.shape == (3, 9)
    np.testing.assert_array_equal(lb.audio_ids[1, 1:], p2.audio_ids)
    assert (
        lb.positions[1].tolist() == [0, *range(8)]
        and lb.valid[2].tolist() == [False] * 5 + [True] * 4
    )
    assert (lb.audio_ids[:, -1] == AS).all()  # left padding: every row ends at P - 1
    with pytest.raises(ValueError, match=r"pad_to=4 is shorter than the longest prompt \(9\)"):
        batch([p1, p2], pad_to=4)
    nb = batch([p3])
    assert nb.features is None


def test_with_the_tiny_text_tokenizer(tmp_path, audio_dir):
    """The official wiring: text via TextTokenizer.encode, ids via its ExtraTokens (349251e)."""
    from kimia_jax.testing.tokenizer import write_tiny_tokenizer
    from kimia_jax.text.tokenizer import TextTokenizer

    tok = TextTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok"))
    assert tok.extra_tokens == EXTRA  # the tiny tokenizer's ids are the fixture's
    fake = FakeAudio({"A.wav": codes(1, 2)})
    builder = PromptBuilder.from_tokenizer(
        tok, fake.tokens, fake.features, kimia_token_offset=OFFSET, num_audio_codes=48
    )
    text = "请将音频内容转换为文字。"
    p = builder.build(
        [
            {"role": "user", "message_type": "text", "content": text},
            {"role": "user", "message_type": "audio", "content": str(audio_dir / "A.wav")},
        ],
        "text",
    )
    ids = tok.encode(text)
    n = len(ids)
    assert p.text_ids.tolist() == [B, *ids] + [B] * 7
    assert p.audio_ids.tolist() == [US] + [B] * n + [MB, *tok_ids(1, 2), ME, CT, MEND, AS]
    assert tok.decode(p.text_ids[1 : 1 + n].tolist()) == text
    with pytest.raises(
        ValueError, match="overlaps the audio ids starting at kimia_token_offset=600"
    ):
        PromptBuilder.from_tokenizer(tok, fake.tokens, None, kimia_token_offset=600)
