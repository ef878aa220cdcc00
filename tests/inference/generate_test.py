"""The compiled dual-stream loop against the reference `_generate_loop` traces (greedy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.configs import OutputType
from kimia_jax.conversion import llm as conv
from kimia_jax.inference import generate as gen
from kimia_jax.models import kimia_llm
from kimia_jax.text.conversation import PromptBatch
from tests.llm_helpers import LLM_DIR, TINY_STREAM, fixture, fixture_prompt, rel_err

STEPS = {"text": 8, "both": 12}  # the fixture's max_new_tokens per mode


@pytest.fixture(scope="module")
def loaded():
    cfg, params = conv.load(LLM_DIR)
    return cfg, params, kimia_llm.KimiaLLM(cfg)


@pytest.fixture(scope="module", params=["text", "both"])
def traced(request, loaded):
    cfg, params, model = loaded
    mode = request.param
    out = gen.generate_fixed(
        params, fixture_prompt(cfg.kimia_adaptor_input_dim), jax.random.key(0), model=model,
        max_new_tokens=STEPS[mode], stream=TINY_STREAM[mode], trace=True,
    )  # fmt: skip
    return mode, out


def test_every_step_logits_match_reference(traced):
    mode, out = traced
    d = fixture()
    for stream in ("text", "audio"):
        got = np.asarray(out.trace[f"{stream}_logits"][:, 0])
        want = d[f"decode_{mode}_{stream}_logits"]
        assert got.shape == want.shape
        for step in range(want.shape[0]):
            err = rel_err(got[step], want[step])
            # measured <= 3.9e-7 (row 0 is the prefill call)
            assert err <= 1e-5, f"{mode}/{stream} step {step}: max rel err {err:.2e}"
        np.testing.assert_array_equal(got.argmax(-1), d[f"decode_{mode}_{stream}_argmax"])


def test_fed_tokens_and_returned_tokens_match_reference(traced):
    mode, out = traced
    d = fixture()
    n = STEPS[mode]
    assert int(out.num_steps[0]) == n  # no stop condition fires in the fixture runs
    hist = out.state
    np.testing.assert_array_equal(hist.audio_history[0, : n - 1], d[f"decode_{mode}_fed_audio_ids"])
    np.testing.assert_array_equal(hist.text_history[0, : n - 1], d[f"decode_{mode}_fed_text_ids"])
    text, audio = gen.returned_tokens(out, TINY_STREAM[mode])
    np.testing.assert_array_equal(text, d[f"decode_{mode}_returned_text_tokens"])
    np.testing.assert_array_equal(audio, d[f"decode_{mode}_returned_audio_tokens"])


def _random_prompt(rng, cfg, length, pad_to):
    audio = np.zeros(pad_to, np.int32)
    text = np.zeros(pad_to, np.int32)
    audio[:length] = rng.integers(cfg.kimia_token_offset, cfg.vocab_size, length)
    text[:length] = rng.integers(1, cfg.kimia_token_offset, length)
    mask = np.zeros(pad_to, bool)
    mask[1 : length // 2] = True
    feat = np.zeros((pad_to, cfg.kimia_adaptor_input_dim), np.float32)
    feat[mask] = rng.standard_normal((mask.sum(), cfg.kimia_adaptor_input_dim))
    return audio, text, mask, feat


def test_batched_generation_equals_single_runs(loaded):
    """4 prompts of different lengths in one call == 4 separate B=1 calls, token for token."""
    cfg, params, model = loaded
    rng = np.random.default_rng(0)
    lengths = [37, 12, 25, 5]
    t = max(lengths)
    rows = [_random_prompt(rng, cfg, n, t) for n in lengths]
    batch = PromptBatch(
        audio_ids=jnp.asarray(np.stack([r[0] for r in rows])),
        text_ids=jnp.asarray(np.stack([r[1] for r in rows])),
        is_continuous=jnp.asarray(np.stack([r[2] for r in rows])),
        features=jnp.asarray(np.stack([r[3] for r in rows])),
        lengths=jnp.asarray(lengths, jnp.int32),
    )
    kw = dict(model=model, max_new_tokens=10, stream=TINY_STREAM["both"])
    together = gen.generate_fixed(params, batch, jax.random.key(0), **kw)
    stream = TINY_STREAM["both"]
    for b, n in enumerate(lengths):
        # Each row alone (B = 1); the shortest one also unpadded, to show that padding is inert.
        for width in (t, n) if n == min(lengths) else (t,):
            single = PromptBatch(
                audio_ids=batch.audio_ids[b : b + 1, :width],
                text_ids=batch.text_ids[b : b + 1, :width],
                is_continuous=batch.is_continuous[b : b + 1, :width],
                features=batch.features[b : b + 1, :width], lengths=jnp.asarray([n], jnp.int32),
            )  # fmt: skip
            alone = gen.generate_fixed(params, single, jax.random.key(0), **kw)
            got, want = gen.returned_tokens(together, stream, b), gen.returned_tokens(alone, stream)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w, err_msg=f"row {b} (length {n}, width {width})")
            np.testing.assert_array_equal(
                together.state.text_history[b], alone.state.text_history[0]
            )


def test_rows_stop_on_their_own(loaded):
    """Each row stops on its own: one on text EOS, one on its own budget."""
    cfg, params, model = loaded
    p = fixture_prompt(cfg.kimia_adaptor_input_dim)
    # Make the fixture's 3rd greedy text token the EOS id for row 0 only, by choosing ids so that
    # the reference argmax at step 2 (445) is treated as EOS.
    stream = gen.StreamConfig(
        output_type=OutputType.TEXT, text_blank=623, text_eos=445, eod_ids=(605, 620)
    )
    two = jax.tree.map(lambda x: None if x is None else jnp.concatenate([x, x]), p)
    out = gen.generate(params, two, jnp.asarray([8, 2], jnp.int32), jax.random.key(0), model=model,
                       max_steps=8, stream=stream)  # fmt: skip
    # row 0: EOS at step 2 -> 3 steps; row 1: its budget of 2 steps ends it first
    np.testing.assert_array_equal(np.asarray(out.num_steps), [3, 2])
    text, _ = gen.returned_tokens(out, stream, 0)
    np.testing.assert_array_equal(text, [32, 161])  # EOS excluded


def test_bad_prompts_get_clear_errors(loaded):
    cfg, _, _ = loaded
    ok = dict(audio_ids=np.zeros((1, 4), np.int32), text_ids=np.zeros((1, 4), np.int32),
              is_continuous=None, features=None, lengths=np.array([4], np.int32))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"audio_ids\[0, 2\] = 728 is outside the vocabulary \[0, 728\)"
    ):
        a = ok["audio_ids"].copy()
        a[0, 2] = 728
        gen.check_prompt(cfg, PromptBatch(**{**ok, "audio_ids": a}), 4, None)
    with pytest.raises(ValueError, match="empty prompt"):
        empty = np.zeros((1, 0), np.int32)
        gen.check_prompt(cfg, PromptBatch(empty, empty, None, None, np.array([0], np.int32)), 4,
                         None)  # fmt: skip
    with pytest.raises(ValueError, match="exceeds the KV cache length 6"):
        gen.check_prompt(cfg, PromptBatch(**ok), 3, 6)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.check_prompt(cfg, PromptBatch(**ok), 0, None)
    with pytest.raises(ValueError, match="takes right-padded prompts"):
        gen.check_prompt(cfg, PromptBatch(**ok, padding="left"), 4, None)


def test_resumable_decode_in_chunks_equals_one_call(loaded, traced):
    """start + resume(until=k) in chunks (the streaming path) == the single compiled call."""
    cfg, params, model = loaded
    mode, whole = traced
    kw = dict(model=model, stream=TINY_STREAM[mode], text_sampling=gen.DEFAULT.text,
              audio_sampling=gen.DEFAULT.audio, trace=False)  # fmt: skip
    n = STEPS[mode]
    state = gen.start(params, fixture_prompt(cfg.kimia_adaptor_input_dim), jnp.asarray([n]),
                      jax.random.key(0), max_steps=n, cache_length=None, cache=None,
                      **kw)  # fmt: skip
    seen = [int(state.stream.step)]
    for until in (3, 7, n):
        state = gen.resume(params, state, jnp.int32(until), **kw)
        seen.append(int(state.stream.step))
    assert seen == [1, 3, 7, n]
    np.testing.assert_array_equal(state.stream.text_history, whole.state.text_history)
    np.testing.assert_array_equal(state.stream.audio_history, whole.state.audio_history)
