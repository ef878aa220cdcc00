"""Shared pieces of the training tests: the official SFT fixtures (fixtures/training, computed by
the official fine-tuning code on the tiny checkpoints), their model, builder and name mapping."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from kimia_jax.conversion import common
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.conversion import whisper as whisper_conv
from kimia_jax.text.tokenizer import TextTokenizer
from kimia_jax.training.examples import SftExampleBuilder, Truncation

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRAIN_FIX = FIXTURES / "training"
LLM_DIR = FIXTURES / "llm"  # = the training fixtures' ../llm (same file)
WHISPER_DIR = FIXTURES / "audio" / "whisper-large-v3"  # = ../whisper_continuous/whisper-large-v3
NAMES = ("00_asr", "01_asr_long", "02_audio_chat", "03_assistant_audio")
OFFSET, NUM_CODES, PAD = 680, 48, 679


@functools.cache
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_pretrained(TRAIN_FIX / "tokenizer")


def builder(truncation: Truncation | None = None) -> SftExampleBuilder:
    return SftExampleBuilder(
        tokenizer(), kimia_token_offset=OFFSET, num_audio_codes=NUM_CODES, truncation=truncation
    )


@functools.cache
def records() -> list[dict]:
    lines = (TRAIN_FIX / "data_with_semantic_codes.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@functools.cache
def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(TRAIN_FIX / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


@functools.cache
def params() -> tuple:
    """(llm_cfg, whisper_cfg, {"llm": ..., "whisper": ...}) in float32."""
    lcfg, lp = llm_conv.load(LLM_DIR)
    wcfg, wp = whisper_conv.load(WHISPER_DIR)
    return lcfg, wcfg, {"llm": lp, "whisper": wp}


def our_grad(grads: dict, name: str) -> np.ndarray:
    """Our gradient of the official parameter `name`, in the official layout."""
    flat = common.flatten(grads)
    if name.startswith("whisper_model.speech_encoder."):
        src = "encoder." + name[len("whisper_model.speech_encoder.") :]
        for rule in whisper_conv.RULES:
            path = rule.match(src)
            if path is not None:
                g = np.asarray(flat["whisper/" + path])
                # the rule maps official -> ours; its transforms are transposes: invert by shape
                if rule.transform is common.conv1d:
                    return np.transpose(g, (2, 1, 0))
                if rule.transform is common.linear:
                    return g.T
                return g
        raise KeyError(name)
    for rule in llm_conv.rules():
        path = rule.match(name)
        if path is not None:
            return np.asarray(flat["llm/" + path])
    raise KeyError(name)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (0 when both are all zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return float(diff / scale) if scale else float(diff)
