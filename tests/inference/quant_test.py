"""int8 weight-only LLM (`KimiAudio(quantize="int8")`, `quant.DECODE`) against the fp32 model.

Measured (fp32 compute, CPU, tiny fixture LLM whose random weights give near-flat logits: top-2
margins down to 0.003 on max |logit| ~6):
- official fixture, "both" mode: all 12 steps' text and audio tokens equal the official ones;
  "text" mode: the first 7 of 8 tokens equal, step 7 flips where the official top-2 margin is
  0.025 (0.5 % of max |logit|), below the int8 logit error there;
- logits: max relative error 1.6e-2 (text) / 2.0e-2 (audio) over the fixture's decode steps,
  1.8e-2 / 2.4e-2 over the prefill of the 100 random prompts;
- 100 random prompts (teacher-forced, every prompt position, both heads): argmax agreement 98.0 %
  (text) / 97.9 % (audio), every disagreement at a near-tie; free-running greedy (16 steps, both
  streams): 44 of 100 rows identical, 11.1 steps agree on average before the first divergence
  (one flipped token changes everything after it on this model).
- weights: 174,336 bytes quantized + 25,440 float vs 662,880 fp32 (3.3x smaller).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.conversion import llm as conv
from kimia_jax.inference import generate as gen
from kimia_jax.layers import quant
from kimia_jax.models import kimia_llm
from kimia_jax.text.conversation import PromptBatch
from tests.llm_helpers import LLM_DIR, TINY_STREAM, fixture, fixture_prompt, rel_err

STEPS = {"text": 8, "both": 12}


@pytest.fixture(scope="module")
def loaded():
    cfg, params = conv.load(LLM_DIR)
    q = quant.quantize(params, "int8", modules=quant.DECODE)
    return cfg, params, q, kimia_llm.KimiaLLM(cfg)


@pytest.mark.parametrize("mode", ["text", "both"])
def test_fixture_greedy_tokens_and_logits(loaded, mode):
    cfg, _, q, model = loaded
    d = fixture()
    n = STEPS[mode]
    out = gen.generate_fixed(q, fixture_prompt(cfg.kimia_adaptor_input_dim), jax.random.key(0),
                             model=model, max_new_tokens=n, stream=TINY_STREAM[mode],
                             trace=True)  # fmt: skip
    # steps whose fed tokens (what the loop chose and fed back) are the official ones
    h = out.state
    same = (np.asarray(h.text_history[0, : n - 1]) == d[f"decode_{mode}_fed_text_ids"]) & (
        np.asarray(h.audio_history[0, : n - 1]) == d[f"decode_{mode}_fed_audio_ids"]
    )
    agree = int(np.argmin(same)) if not same.all() else n - 1
    text, audio = gen.returned_tokens(out, TINY_STREAM[mode])
    if same.all() and np.array_equal(text, d[f"decode_{mode}_returned_text_tokens"]):
        agree = n
    # logits within the measured bound while the fed tokens are the official ones
    for s in ("text", "audio"):
        for k in range(min(agree + 1, n)):
            err = rel_err(out.trace[f"{s}_logits"][k, 0], d[f"decode_{mode}_{s}_logits"][k])
            assert err <= 3e-2, f"{mode}/{s} step {k}: int8 logits rel err {err:.2e}"
    if mode == "both":
        assert agree == n
        np.testing.assert_array_equal(text, d["decode_both_returned_text_tokens"])
        np.testing.assert_array_equal(audio, d["decode_both_returned_audio_tokens"])
    else:  # the flip is at a near-tie of the official logits (margin 0.025 of max 5.2)
        assert agree == 7
        scale = np.abs(d["decode_text_text_logits"][agree]).max()
        assert d["decode_text_text_top2_margin"][agree] < 3e-2 * scale


def test_int8_folder_gives_the_quantize_on_load_tokens(loaded, tmp_path):
    """A folder converted with quantize="int8" (`conv.convert_to_orbax`), loaded directly as
    int8, gives exactly the greedy tokens ("both" mode: both heads, all 12 fixture steps) and
    logits (max abs diff 0.0) of the fp32 model quantized on load: the same q and scales."""
    cfg, _, q, model = loaded
    conv.convert_to_orbax(LLM_DIR, tmp_path / "int8", dtype="float32", progress=False,
                          quantize="int8")  # fmt: skip
    _, direct = conv.load(tmp_path / "int8")
    prompt = fixture_prompt(cfg.kimia_adaptor_input_dim)
    for mode in ("both",):
        kw = dict(model=model, max_new_tokens=STEPS[mode], stream=TINY_STREAM[mode], trace=True)
        want = gen.generate_fixed(q, prompt, jax.random.key(0), **kw)
        got = gen.generate_fixed(direct, prompt, jax.random.key(0), **kw)
        for a, b in zip(gen.returned_tokens(got, TINY_STREAM[mode]),
                        gen.returned_tokens(want, TINY_STREAM[mode]), strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
        for s in ("text", "audio"):
            np.testing.assert_array_equal(got.trace[f"{s}_logits"], want.trace[f"{s}_logits"])


def _random_batch(cfg, b=100, t=40, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, t + 1, b)
    audio, text = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    feat = np.zeros((b, t, cfg.kimia_adaptor_input_dim), np.float32)
    for r, n in enumerate(lengths):
        audio[r, :n] = rng.integers(cfg.kimia_token_offset, cfg.vocab_size, n)
        text[r, :n] = rng.integers(1, cfg.kimia_token_offset, n)
        mask[r, 1 : n // 2] = True
        feat[r][mask[r]] = rng.standard_normal((mask[r].sum(), cfg.kimia_adaptor_input_dim))
    return PromptBatch(
        audio_ids=jnp.asarray(audio), text_ids=jnp.asarray(text), is_continuous=jnp.asarray(mask),
        features=jnp.asarray(feat), lengths=jnp.asarray(lengths, jnp.int32),
    )  # fmt: skip


@pytest.mark.slow  # ~45 s on 2 loaded cores (two B=100 decode compiles)
def test_hundred_random_prompts(loaded):
    cfg, params, q, model = loaded
    batch = _random_batch(cfg)
    b, t = batch.audio_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    fwd = jax.jit(model.apply)
    args = (batch.audio_ids, batch.text_ids, pos, batch.features, batch.is_continuous)
    ref, got = fwd({"params": params}, *args), fwd({"params": q}, *args)
    valid = np.arange(t)[None] < np.asarray(batch.lengths)[:, None]
    for s in ("text", "audio"):
        a = np.asarray(getattr(ref, f"{s}_logits"))[valid]
        g = np.asarray(getattr(got, f"{s}_logits"))[valid]
        err = rel_err(g, a)
        assert err <= 3e-2, f"{s}: int8 prefill logits rel err {err:.2e}"
        same = a.argmax(-1) == g.argmax(-1)
        assert same.mean() >= 0.97, f"{s}: argmax agreement {same.mean():.3f}"
        # every flip is a near-tie: the fp32 top-2 margin is below twice the max logit error
        top2 = np.sort(a, -1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0])[~same]
        assert (margin <= 2 * np.abs(g - a).max()).all()
    kw = dict(model=model, max_new_tokens=16, stream=TINY_STREAM["both"])
    fa = gen.generate_fixed(params, batch, jax.random.key(0), **kw).state
    fq = gen.generate_fixed(q, batch, jax.random.key(0), **kw).state
    eq = np.asarray((fa.text_history == fq.text_history) & (fa.audio_history == fq.audio_history))
    first = np.where(eq.all(1), eq.shape[1], eq.argmin(1))
    # measured: 44 rows identical, 11.1 steps before the first divergence (see the docstring)
    assert eq.all(1).sum() >= 35 and first.mean() >= 9.5, (eq.all(1).sum(), first.mean())


def test_weight_bytes(loaded):
    _, params, q, _ = loaded
    s = quant.summary(q)
    assert s == {"quantized": 174336, "float": 25440} and quant.nbytes(params) == 662880
    # every matrix a decode step reads is int8 (+ one fp32 scale per row)
    flat = {k: v for k, v in jax.tree_util.tree_flatten_with_path(
        q, is_leaf=lambda x: isinstance(x, quant.QWeight))[0]}  # fmt: skip
    n_q = sum(isinstance(v, quant.QWeight) for v in flat.values())
    assert n_q == 5 * 7 + 3  # 5 layers x 7 projections, 2 heads, the embedding
