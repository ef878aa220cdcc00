"""KimiAudio end to end: audio file -> GLM tokens + whisper features -> prompt -> compiled loop.

The model folder is assembled from the official fixtures in the released layout (LLM fixture,
tiny GLM-4-Voice tokenizer and whisper of the same fixture set, the tiny tokenizer files), so
the whole path reproduces the reference `_generate_loop` outputs of tests/fixtures/llm.
"""

import shutil

import jax
import numpy as np
import pytest

from kimia_jax.configs import OutputType
from kimia_jax.inference import generate as gen
from kimia_jax.inference import pipeline
from kimia_jax.inference.api import KimiAudio
from kimia_jax.inference.sampler import Sampling
from kimia_jax.testing.tokenizer import write_tiny_tokenizer
from kimia_jax.text import conversation as prompt_lib
from tests.llm_helpers import LLM_DIR, fixture, rel_err

FIX = LLM_DIR.parent
# The fixture prompt's text message: 9 synthetic ids, one per word (fixtures README).
INSTRUCTION = "Please transcribe the following audio clip word by word."
AUDIO = str(LLM_DIR / "llm_prompt_crop_16k.flac")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi") / "Kimi-Audio-7B-Instruct"
    root.mkdir()
    shutil.copy(LLM_DIR / "config.json", root)
    shutil.copy(LLM_DIR / "model.safetensors", root)
    write_tiny_tokenizer(root)
    shutil.copytree(FIX / "audio" / "whisper-large-v3", root / "whisper-large-v3")
    shutil.copytree(FIX / "audio" / "glm-4-voice-tokenizer", root / "glm-4-voice-tokenizer")
    m = KimiAudio(root, load_detokenizer=False, dtype="float32", prompt_version="2607d51")
    synthetic = [int(x) for x in fixture()["text_input_ids"][0, 1:10]]
    encode = m.prompt_builder.text_encode_fn
    m.prompt_builder.text_encode_fn = lambda s: synthetic if s == INSTRUCTION else encode(s)
    return m


def _asr(audio=AUDIO):
    return [
        {"role": "user", "message_type": "text", "content": INSTRUCTION},
        {"role": "user", "message_type": "audio", "content": audio},
    ]


def test_prompt_from_audio_file_equals_reference(model):
    d = fixture()
    p = model.prompt_builder.build(_asr(), "text")
    np.testing.assert_array_equal(p.audio_ids, d["audio_input_ids"][0])  # GLM tokens of the file
    np.testing.assert_array_equal(p.text_ids, d["text_input_ids"][0])
    np.testing.assert_array_equal(p.is_continuous, d["is_continuous_mask"][0])
    (feat,) = p.features
    err = rel_err(feat, d["whisper_feature"][0, : len(feat)])
    assert err <= 1e-5, f"whisper feature max rel err {err:.2e}"


def test_generate_reproduces_reference_text(model):
    d = fixture()
    _, text = model.generate(_asr(), output_type="text", max_new_tokens=8)
    want = [t for t in d["decode_text_returned_text_tokens"] if t < model.kimia_token_offset]
    assert text == model.tokenizer.decode(want)


def test_both_mode_tokens_through_the_api_path(model):
    """output_type "both": the API's prompt + compiled loop give the reference audio tokens."""
    d = fixture()
    p = model.prompt_builder.build(_asr(), "both")
    # The fixture's "both" run used the "text" prompt (ct marker); only the marker differs.
    assert p.audio_ids[-3] == model.extra_tokens.kimia_speech_ctd_id
    pb = prompt_lib.batch([p], feature_dim=model.cfg.kimia_adaptor_input_dim)
    audio_ids = pb.audio_ids.copy()
    audio_ids[0, pb.lengths[0] - 3] = model.extra_tokens.kimia_speech_ct_id
    prompt = pb.replace(audio_ids=audio_ids)
    stream = model._stream_cfg(OutputType.BOTH)
    out = gen.generate_fixed(model.params, prompt, gen.jax.random.key(0), model=model.model,
                             max_new_tokens=12, stream=stream)  # fmt: skip
    text, audio = gen.returned_tokens(out, stream)
    np.testing.assert_array_equal(text, d["decode_both_returned_text_tokens"])
    np.testing.assert_array_equal(audio, d["decode_both_returned_audio_tokens"])


def test_batch_of_four_equals_single_runs(model):
    import soundfile as sf

    wav, sr = sf.read(AUDIO, dtype="float32")
    clips = [wav, wav[: sr // 2], np.concatenate([wav, wav[::-1]]), np.zeros(sr, np.float32)]
    chats = [_asr(c) for c in clips]
    together = model.generate_batch(chats, "text", max_new_tokens=8)
    for chat, got in zip(chats, together, strict=True):
        assert model.generate(chat, "text", max_new_tokens=8) == got


def test_two_meshes_in_one_process_give_the_single_device_results(model):
    """The same folder on one device and on a data=2, fsdp=2, tensor=2 mesh of 8 (simulated)
    devices, used alternately in one process (each instance runs under its own context mesh):
    greedy text and "both"-mode audio and text tokens of a batch equal the single-device ones."""
    from kimia_jax import sharding

    mesh = sharding.parse_mesh("data=2,fsdp=2,tensor=2")
    sharded = KimiAudio(model.model_path, load_detokenizer=False, dtype="float32",
                        prompt_version="2607d51", mesh=mesh)  # fmt: skip
    sharded.prompt_builder.text_encode_fn = model.prompt_builder.text_encode_fn
    leaf = sharded.params["lm_head"]["weight"]
    assert len(leaf.sharding.device_set) == 8
    chats = [_asr(), _asr(AUDIO), [{"role": "user", "message_type": "text", "content": "hi"}]]
    samp = Sampling(max_new_tokens=8)

    def tokens(m, output_type):
        prompts = m.prompts(chats, output_type)
        batch = pipeline.plan_batch(prompts, output_type, samp.max_new_tokens, m.cfg)
        out = pipeline.run_generate(m.params, m.model, batch, m._stream_cfg(output_type), samp,
                                    jax.random.key(0), m.mesh)  # fmt: skip
        return out.tokens

    want = {t: tokens(model, t) for t in OutputType}
    for _ in range(2):  # alternately: single device, mesh, single device, mesh
        for m in (model, sharded):
            for t in OutputType:
                assert tokens(m, t) == want[t], (m.mesh, t)
    assert any(audio for audio, _ in want[OutputType.BOTH])  # real audio tokens were compared
    texts = [w[1] for w in model.generate_batch(chats, "text", max_new_tokens=8)]
    assert [g[1] for g in sharded.generate_batch(chats, "text", max_new_tokens=8)] == texts


def test_each_audio_file_is_read_once_and_encoded_in_one_batched_call(model, monkeypatch):
    """generate_batch loads every distinct clip once and runs ONE tokenizer call and ONE
    whisper feature call over all of them (their plan_batches groups the segments)."""
    import soundfile as sf

    wav, _ = sf.read(AUDIO, dtype="float32")
    reads, tok_calls, feat_calls = [], [], []
    load = pipeline.load_audio
    monkeypatch.setattr(pipeline, "load_audio", lambda a: reads.append(a) or load(a))
    tokenize, features = model.audio_tokenizer.tokenize, model.whisper.features
    monkeypatch.setattr(model.audio_tokenizer, "tokenize",
                        lambda x: tok_calls.append(len(x)) or tokenize(x))  # fmt: skip
    monkeypatch.setattr(model.whisper, "features",
                        lambda x: feat_calls.append(len(x)) or features(x))  # fmt: skip
    # AUDIO three times (twice in one chat), one array clip, one text-only chat
    chats = [_asr(), _asr(wav[:8000]), _asr(AUDIO) + [
        {"role": "user", "message_type": "audio", "content": AUDIO}],
        [{"role": "user", "message_type": "text", "content": "hi"}]]  # fmt: skip
    got = model.generate_batch(chats, "text", max_new_tokens=8)
    assert [str(r) for r in reads if not isinstance(r, np.ndarray)] == [AUDIO]
    assert len(reads) == 2 and tok_calls == [2] and feat_calls == [2]
    monkeypatch.undo()
    for chat, g in zip(chats, got, strict=True):
        assert model.generate(chat, "text", max_new_tokens=8) == g


def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(output_type="text", max_new_tokens=8, text_temperature=0.9, text_top_k=50)
    a = model.generate(_asr(), seed=3, **kw)
    assert a == model.generate(_asr(), seed=3, **kw)
    others = {model.generate(_asr(), seed=s, **kw)[1] for s in (4, 5, 6)}
    assert len(others | {a[1]}) > 1  # different keys give different samples


def test_text_stream_equals_generate(model):
    _, text = model.generate(_asr(), output_type="text", max_new_tokens=8)
    pieces = list(
        model.generate_stream(_asr(), output_type="text", max_new_tokens=8, chunk_steps=3)
    )
    assert "".join(p["text"] for p in pieces) == text
    assert all(p["audio"] is None for p in pieces)


def test_bad_requests_get_clear_errors(model, tmp_path):
    with pytest.raises(prompt_lib.PromptError, match="unknown role 'system'"):
        model.generate([{"role": "system", "message_type": "text", "content": "hi"}])
    with pytest.raises(prompt_lib.PromptError, match="unknown message_type 'video'"):
        model.generate([{"role": "user", "message_type": "video", "content": "x"}])
    with pytest.raises(prompt_lib.PromptError, match="empty"):
        model.generate([])
    with pytest.raises(prompt_lib.PromptError, match="text content must be a str"):
        model.generate([{"role": "user", "message_type": "text", "content": np.zeros(16000)}])
    with pytest.raises(Exception, match="missing.wav"):
        model.generate(_asr(str(tmp_path / "missing.wav")))
    with pytest.raises(ValueError, match=r"output_type must be one of \['text', 'both'\]"):
        model.generate(_asr(), output_type="speech")
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 8192"):
        model.generate(_asr(), output_type="text", max_new_tokens=9000)
