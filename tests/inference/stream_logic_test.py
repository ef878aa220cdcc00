"""Generation bookkeeping vs the official `_generate_loop`.

Two references:
* the LLM fixture's decode traces (official loop on the tiny model, greedy; tests/fixtures/prompt),
  driven here by the fixture's per-step logits;
* `ref_generate_loop` (torch transcription of kimia.py at commit 2607d51, reference_loop.py) on
  synthetic logits built to hit every branch: text eos (fed once, then blanks), audio stop on
  msg_end / media_end, stop tokens inside the 6-step delay (ignored), budgets, repetition penalty
  over histories that contain forced blanks, sampling.
The model is replaced by fixed per-step logits: the bookkeeping never looks at the model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.configs import OutputType
from kimia_jax.inference import stream_logic as sl
from kimia_jax.inference.sampler import SamplingParams

torch = pytest.importorskip("torch")
from tools.reference_loop import ref_generate_loop  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "fixtures" / "prompt"
V = 728
BLANK, TEOS, MEND, MEDIA_END, OFFSET = 623, 624, 605, 620, 680
CFG = {m: sl.StreamConfig(OutputType(m), BLANK, TEOS, (MEND, MEDIA_END)) for m in ("text", "both")}


@functools.partial(jax.jit, static_argnames=("cfg", "tp", "ap", "max_steps"))
def run_loop(cfg, text_logits, audio_logits, budget, key, tp, ap, max_steps):
    """A model-free decode loop: step i reads logits [:, i]; records what would be fed."""
    b = text_logits.shape[0]
    state = sl.StreamState.init(budget, max_steps)
    fed = jnp.full((2, b, max_steps), -1, jnp.int32)

    def body(carry):
        state, fed, key = carry
        i = state.step
        key, sub = jax.random.split(key)
        tl = jax.lax.dynamic_index_in_dim(text_logits, i, axis=1, keepdims=False)
        al = jax.lax.dynamic_index_in_dim(audio_logits, i, axis=1, keepdims=False)
        state, nt, na = sl.sample_and_advance(cfg, state, tl, al, sub, tp, ap)
        fed_now = ~state.done  # rows that continue feed (na, nt) to the next forward
        fed = fed.at[0, :, i].set(jnp.where(fed_now, na, -1))
        fed = fed.at[1, :, i].set(jnp.where(fed_now, nt, -1))
        return state, fed, key

    state, fed, _ = jax.lax.while_loop(lambda c: ~c[0].all_done, body, (state, fed, key))
    return state, fed


GREEDY = SamplingParams(0.0, 5, 1.0, 16)


def _ref_params(p: SamplingParams) -> dict:
    return dict(
        top_k=p.top_k,
        temperature=p.temperature,
        penalty=p.repetition_penalty,
        window=p.repetition_window,
    )


def _fed_list(fed: np.ndarray, row: int) -> list[tuple[int, int]]:
    a, t = fed[0, row], fed[1, row]
    return [(int(x), int(y)) for x, y in zip(a, t, strict=True) if x >= 0]


@pytest.fixture(scope="module")
def trace():
    return np.load(FIXTURES / "llm_decode_trace.npz")


@pytest.mark.parametrize("mode,steps", [("text", 8), ("both", 12)])
def test_fixture_decode_traces(mode, steps, trace, tmp_path):
    """Greedy loop on the fixture's logits reproduces what the official loop fed and returned."""
    tl = trace[f"decode_{mode}_text_logits"][None]  # [1, steps, V]
    al = trace[f"decode_{mode}_audio_logits"][None]
    assert tl.shape == (1, steps, V)
    state, fed = run_loop(
        CFG[mode], tl, al, jnp.array([steps]), jax.random.key(0), GREEDY, GREEDY, steps
    )
    fed = np.asarray(fed)
    np.testing.assert_array_equal(
        np.asarray(state.text_history[0]), trace[f"decode_{mode}_text_argmax"]
    )
    feds = _fed_list(fed, 0)
    assert len(feds) == steps - 1  # budget: the last step's tokens are recorded, never fed
    assert [a for a, _ in feds] == trace[f"decode_{mode}_fed_audio_ids"].tolist()
    assert [t for _, t in feds] == trace[f"decode_{mode}_fed_text_ids"].tolist()
    (audio, text) = sl.returned_tokens(CFG[mode], state)[0]
    assert text == trace[f"decode_{mode}_returned_text_tokens"].tolist()
    assert audio == trace[f"decode_{mode}_returned_audio_tokens"].tolist()
    assert int(state.step) == steps and bool(state.done[0])
    # The fixture's fed positions are T + k (k = 0..steps-2): what the caller feeds at step k+1.
    np.testing.assert_array_equal(
        trace[f"decode_{mode}_fed_position_ids"], 37 + np.arange(steps - 1)
    )


def _scripted_logits(rng, steps: int, picks: dict[int, int], noise: float = 1.0) -> np.ndarray:
    """Random logits whose argmax at step i is picks[i] (when given)."""
    x = rng.normal(0, noise, (steps, V)).astype(np.float32)
    for i, tok in picks.items():
        x[i, tok] = x[i].max() + 3.0
    return x


def _repeating(steps: int) -> np.ndarray:
    """Id 100 slightly ahead of 101 at every step: a repetition penalty alternates them."""
    x = np.zeros((steps, V), np.float32)
    x[:, 100], x[:, 101] = 1.0, 0.9
    return x


def _scenarios(mode: str):
    """(name, text_logits, audio_logits, budget) rows exercising each branch."""
    rng = np.random.default_rng(0)
    s = 24
    rows = [
        (
            "repeating ids",
            _repeating(s),
            _repeating(s) + _scripted_logits(rng, s, {20: MEND}, 0.01),
            22,
        )
    ]
    if mode == "text":
        rows.append(
            ("eos at 3", _scripted_logits(rng, s, {3: TEOS}), _scripted_logits(rng, s, {}), 20)
        )
        rows.append(
            ("eos at 0", _scripted_logits(rng, s, {0: TEOS}), _scripted_logits(rng, s, {}), 20)
        )
        rows.append(
            ("budget", _scripted_logits(rng, s, {}), _scripted_logits(rng, s, {2: MEND}), 9)
        )
        picks = {1: BLANK, 4: OFFSET + 3, 6: TEOS}  # blank and an audio id before eos stay in
        rows.append(("blank before eos", _scripted_logits(rng, s, picks),
                     _scripted_logits(rng, s, {}), 24))  # fmt: skip
    else:
        rows.append(("msg_end at 9, eos at 2", _scripted_logits(rng, s, {2: TEOS, 5: TEOS}),
                     _scripted_logits(rng, s, {3: MEND, 9: MEND}), 24))  # fmt: skip
        rows.append(("media_end at 6", _scripted_logits(rng, s, {}),
                     _scripted_logits(rng, s, {5: MEDIA_END, 6: MEDIA_END}), 24))  # fmt: skip
        rows.append(("budget, no stop", _scripted_logits(rng, s, {10: TEOS}),
                     _scripted_logits(rng, s, {0: MEND}), 15))  # fmt: skip
        rows.append(("stop at last step", _scripted_logits(rng, s, {}),
                     _scripted_logits(rng, s, {23: MEND}), 24))  # fmt: skip
    return rows


@pytest.mark.torch
@pytest.mark.parametrize("mode", ["text", "both"])
@pytest.mark.parametrize(
    "tp,ap",
    [
        (GREEDY, GREEDY),
        # penalties bite: histories hold forced blanks (audio) and repeated text ids
        (SamplingParams(0.0, 5, 1.5, 3), SamplingParams(0.0, 5, 3.0, 4)),
    ],
)
def test_batched_loop_matches_reference_loop(mode, tp, ap):
    rows = _scenarios(mode)
    if tp.repetition_penalty > 1:  # flatter logits so that the penalty changes greedy picks
        rows = [(n, t * 0.2, a * 0.2, bud) for n, t, a, bud in rows]
    tl = np.stack([r[1] for r in rows])
    al = np.stack([r[2] for r in rows])
    budget = np.array([r[3] for r in rows], np.int32)
    state, fed = run_loop(CFG[mode], tl, al, budget, jax.random.key(0), tp, ap, tl.shape[1])
    fed = np.asarray(fed)
    got = sl.returned_tokens(CFG[mode], state)
    for b, (name, t, a, bud) in enumerate(rows):
        want_audio, want_text, want_fed = ref_generate_loop(
            t,
            a,
            max_new_tokens=int(bud),
            output_type=mode,
            blank=BLANK,
            text_eos=TEOS,
            eod_ids=(MEND, MEDIA_END),
            text_params=_ref_params(tp),
            audio_params=_ref_params(ap),
        )
        assert got[b] == (want_audio, want_text), name
        assert _fed_list(fed, b) == want_fed, name
    if tp.repetition_penalty > 1:  # the penalty alternates the repeating row's picks
        assert 101 in got[0][1]
    if mode == "both" and tp.repetition_penalty == 1.0:
        # sanity of the scenarios themselves: row 1 stops on msg_end at step 9
        assert got[1][0][-1] == MEND and len(_fed_list(fed, 1)) == 9


def test_penalty_history_includes_forced_blanks():
    """Audio history steps 0-5 are blanks: with a window of 4 the blank is penalised at step 6;
    at step 7 the window [b, b, b, 700] penalises both, so the blank wins again."""
    cfg = CFG["both"]
    al = np.zeros((1, 8, V), np.float32)
    al[0, :, BLANK] = 2.0
    al[0, :, 700] = 1.5  # second best; wins once the blank is penalised (2 / 1.5 < 1.5)
    tl = np.zeros((1, 8, V), np.float32)
    ap = SamplingParams(0.0, 5, 1.5, 4)
    state, _ = run_loop(cfg, tl, al, jnp.array([8]), jax.random.key(0), GREEDY, ap, 8)
    assert np.asarray(state.audio_history[0]).tolist() == [BLANK] * 6 + [700, BLANK]


def test_sampled_streams_reproducible():
    rng = np.random.default_rng(5)
    tl = rng.normal(0, 1, (2, 10, V)).astype(np.float32)
    al = rng.normal(0, 1, (2, 10, V)).astype(np.float32)
    tp, ap = SamplingParams(0.9, 10, 1.0, 16), SamplingParams(0.8, 10, 1.0, 64)
    outs = [
        run_loop(CFG["both"], tl, al, jnp.array([10, 10]), jax.random.key(k), tp, ap, 10)[0]
        for k in (1, 1, 2)
    ]
    np.testing.assert_array_equal(outs[0].audio_history, outs[1].audio_history)
    np.testing.assert_array_equal(outs[0].text_history, outs[1].text_history)
    assert (np.asarray(outs[0].audio_history) != np.asarray(outs[2].audio_history)).any()
    # audio delay holds for sampled streams too
    assert (np.asarray(outs[0].audio_history)[:, :6] == BLANK).all()


def test_budgets_and_zero_budget():
    assert sl.budgets(OutputType.BOTH, [37, 100]).tolist() == [1463, 1400]
    assert sl.budgets(OutputType.TEXT, [37, 100]).tolist() == [7463, 7400]
    assert sl.budgets(OutputType.TEXT, [37, 100], max_new_tokens=8).tolist() == [8, 8]
    state = sl.StreamState.init(np.array([0, 3]), 3)
    assert np.asarray(state.done).tolist() == [True, False]
    with pytest.raises(ValueError, match="max_steps=2 is smaller than the largest budget"):
        sl.StreamState.init(np.array([3]), 2)


def test_postprocess_filters_and_detokenizes():
    decoded = []

    def decode(ids):
        decoded.append(ids)
        return "|".join(map(str, ids))

    audio = [OFFSET + 5, 300, OFFSET, OFFSET + 47, MEND]
    text = [32, 700, 161, TEOS, 445]  # an eos can only be here if sampled before... cut anyway
    codes, s = sl.postprocess(
        audio, text, kimia_token_offset=OFFSET, text_eos=TEOS, decode_fn=decode
    )
    assert codes.tolist() == [5, 0, 47] and codes.dtype == np.int64
    assert s == "32|161" and decoded == [[32, 161]]


def test_postprocess_fixture_both_with_tiny_tokenizer(trace, tmp_path):
    """§6.5 on the fixture's "both" run: audio ids < 680 dropped, text decoded by the tokenizer."""
    from kimia_jax.testing.tokenizer import write_tiny_tokenizer
    from kimia_jax.text.tokenizer import TextTokenizer

    tok = TextTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    audio = trace["decode_both_returned_audio_tokens"].tolist()  # [378, 165, 717, 586, 444, 691]
    text = trace["decode_both_returned_text_tokens"].tolist()
    codes, s = sl.postprocess(
        audio, text, kimia_token_offset=OFFSET, text_eos=TEOS, decode_fn=tok.decode
    )
    assert codes.tolist() == [717 - OFFSET, 691 - OFFSET]
    assert s == tok.decode(text) and "[EOT]" in s  # 609 = base + 9 = [EOT]: decoded literally
