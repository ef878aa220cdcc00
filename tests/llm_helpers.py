"""Shared pieces of the LLM tests: the fixture checkpoint, its prompt, error metrics."""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import OutputType
from kimia_jax.inference.stream_logic import StreamConfig
from kimia_jax.text.conversation import PromptBatch

LLM_DIR = Path(__file__).parent / "fixtures" / "llm"
# Special ids of the tiny fixture checkpoint (fixtures README).
TINY_STREAM = {
    mode: StreamConfig(
        output_type=OutputType(mode), text_blank=623, text_eos=624, eod_ids=(605, 620)
    )
    for mode in ("text", "both")
}


@functools.cache
def fixture() -> dict[str, np.ndarray]:
    with np.load(LLM_DIR / "fixture.npz") as d:
        return {k: d[k] for k in d.files}


def fixture_prompt(din: int) -> PromptBatch:
    """The fixture's [user text, user audio] prompt with whisper features scattered to the mask."""
    d = fixture()
    t = d["audio_input_ids"].shape[1]
    feat = np.zeros((1, t, din), np.float32)
    idx = np.nonzero(d["is_continuous_mask"][0])[0]
    feat[0, idx] = d["whisper_feature"][0, : len(idx)]
    return PromptBatch(
        audio_ids=jnp.asarray(d["audio_input_ids"], jnp.int32),
        text_ids=jnp.asarray(d["text_input_ids"], jnp.int32),
        is_continuous=jnp.asarray(d["is_continuous_mask"]),
        features=jnp.asarray(feat),
        lengths=jnp.asarray([t], jnp.int32),
    )


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
