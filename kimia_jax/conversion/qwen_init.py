"""A Kimi-Audio checkpoint for pre-training, built from a plain Qwen2.5 Hugging Face checkpoint.

The report initialises the shared layers and the text head from Qwen2.5-7B, extends the vocabulary
with the semantic audio codes and special tokens and initialises the MIMO (audio-head) layers
randomly (spec/training.md §3.7). What it leaves open is chosen here (each choice is an option):

* `model.layers.*`, `model.norm`: copied bit-identically (fact).
* `embed_tokens`, `lm_head` rows `[0, qwen_vocab)`: copied bit-identically (fact); a tied Qwen
  (0.5B-3B) gives its embedding to `lm_head`.
* `embed_tokens`, `lm_head` rows `[qwen_vocab, V)` (specials Qwen lacks, the 16384 audio codes):
  mean of the Qwen BPE rows `[0, num_base_tokens)` + `row_noise` x per-dimension std x N(0, 1)
  (spec proposal).
* `embed_tokens` row of `kimia_text_blank`: **zero** (our choice; the spec is silent). The filler
  of the audio stream then adds nothing, so a text-only sequence (`b` in the audio stream, text in
  the text stream, spec §3.4) runs exactly the Qwen forward: text logits equal Qwen's at step 0.
* `model.mimo_norm`: copy of `model.norm` (spec proposal).
* `mimo_output` (all rows): mean of the Qwen text-head BPE rows + noise, like new rows (spec).
* `model.mimo_layers.*`: "random" (report) = what `MoonshotKimiaForCausalLM(config)` initialises
  (Qwen2 `_init_weights`: N(0, initializer_range) matrices, zero biases, unit RMSNorm); or
  "copy_top": copies of main layers `mimo_from_layer + 1 ...` (a warm start, not the report).
* `model.vq_adaptor.*`: the same HF default: N(0, initializer_range) weights, zero biases,
  LayerNorm (1, 0) (spec: "adaptor default").

Special ids follow the released layout: `num_base_tokens` BPE ranks, then `num_text_specials` (421)
specials (media_begin = +18, media_end = +20, blank = +23, pad = last), then the audio codes at
`kimia_token_offset = num_base_tokens + num_text_specials` (152064 for Qwen2.5-7B, whose padded
vocabulary is exactly that size). Qwen's rows at Kimi's special ids are kept as they are (the ids
of Kimi's `msg_end` and Qwen's `<|im_end|>` coincide; the other used specials sit in Qwen's
untrained padding rows).

Output: `config.json` + `model-<i>-of-<n>.safetensors` + index in the released naming, readable by
`kimia_jax.conversion.llm.load`. Source tensors are read one at a time; peak host memory is about
one output shard (`max_shard_bytes`) plus the largest matrix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from kimia_jax.configs import LlmConfig
from kimia_jax.configs import base as configs_base
from kimia_jax.conversion import common
from kimia_jax.conversion.llm import _LAYER_PARTS
from kimia_jax.errors import CheckpointError

# Offsets of the specials the forward/prompt builder use, relative to num_base_tokens
# (spec/llm.md §1.3).
MEDIA_BEGIN, MEDIA_END, TEXT_BLANK = 18, 20, 23
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenization_kimia.py")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitOptions:
    """How the Kimi-Audio parts the report leaves open are initialised (see the module docstring).

    Attributes:
      num_base_tokens: BPE ranks of the tokenizer (151643 for Qwen2.5 / Kimi-Audio).
      num_text_specials: Kimi special ids after the BPE ranks (421 in the release).
      num_audio_codes: semantic codes appended after the text vocabulary (16384).
      kimia_mimo_layers: layers of the audio branch (6 in the release).
      mimo_from_layer: main layer whose output seeds the branch; None = L - mimo_layers - 1 (21 for
        the 28-layer 7B, as released).
      adaptor_input_dim: 4 x Whisper d_model (5120 for whisper-large-v3).
      mimo_init: "random" (report) or "copy_top" (copy main layers mimo_from_layer + 1 ...).
      row_noise: std of the noise added to mean-initialised rows, relative to the per-dimension
        std of the source rows.
      zero_blank_embedding: zero the `kimia_text_blank` embedding row (text-only exactness).
      seed: numpy seed of every random tensor.
    """

    num_base_tokens: int = 151643
    num_text_specials: int = 421
    num_audio_codes: int = 16384
    kimia_mimo_layers: int = 6
    mimo_from_layer: int | None = None
    adaptor_input_dim: int = 5120
    mimo_init: str = "random"
    row_noise: float = 0.01
    zero_blank_embedding: bool = True
    seed: int = 0


def kimia_config(qwen: dict[str, Any], opts: InitOptions, source: str = "config.json") -> dict:
    """The released-layout Kimi-Audio config.json for a Qwen2 config dict."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if key not in qwen:
            raise CheckpointError(f"{source}: missing required Qwen2 config key {key!r}")
    if qwen.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(
            f"{source}: model_type {qwen.get('model_type')!r} is not 'qwen2'; give a Qwen2/Qwen2.5 "
            "checkpoint"
        )
    if qwen.get("rope_scaling"):
        raise CheckpointError(
            f"{source}: rope_scaling {qwen['rope_scaling']} is not supported by KimiaLLM; "
            "remove it from config.json (Kimi-Audio uses plain RoPE)"
        )
    if qwen.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    layers = qwen["num_hidden_layers"]
    mimo = opts.kimia_mimo_layers
    start = layers - mimo - 1 if opts.mimo_from_layer is None else opts.mimo_from_layer
    if not 0 <= start < layers:
        raise CheckpointError(
            f"mimo_from_layer {start} is outside the {layers} main layers of {source}; pass "
            "mimo_from_layer explicitly"
        )
    if opts.mimo_init == "copy_top" and start + mimo >= layers:
        raise CheckpointError(
            f"mimo_init='copy_top' needs main layers {start + 1}..{start + mimo}, but {source} has "
            f"{layers}; lower mimo_from_layer or kimia_mimo_layers"
        )
    if opts.mimo_init not in ("random", "copy_top"):
        raise ValueError(f"mimo_init must be 'random' or 'copy_top', got {opts.mimo_init!r}")
    text_vocab = opts.num_base_tokens + opts.num_text_specials
    if qwen["vocab_size"] > text_vocab:
        raise CheckpointError(
            f"{source}: vocab_size {qwen['vocab_size']} exceeds num_base_tokens + "
            f"num_text_specials = {text_vocab}; Qwen rows would overlap the audio codes (raise "
            "num_text_specials)"
        )
    nb = opts.num_base_tokens
    out = {k: v for k, v in qwen.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    out.update(
        {
            "architectures": ["MoonshotKimiaForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
                "AutoModel": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
                "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
            },
            "model_type": "kimi_audio",
            "vocab_size": text_vocab + opts.num_audio_codes,
            "tie_word_embeddings": False,
            "bos_token_id": nb,
            "eos_token_id": nb + 1,
            "pad_token_id": text_vocab - 1,
            "num_base_tokens": nb,
            "kimia_text_output_vocab": text_vocab,
            "kimia_token_offset": text_vocab,
            "kimia_audio_output_vocab": opts.num_audio_codes + 512,
            "num_audio_special_tokens": 512,
            "kimia_media_begin": nb + MEDIA_BEGIN,
            "kimia_media_end": nb + MEDIA_END,
            "kimia_mimo_layers": mimo,
            "kimia_mimo_transformer_from_layer_index": start,
            "kimia_mimo_audiodelaytokens": 6,
            "kimia_adaptor_input_dim": opts.adaptor_input_dim,
            "use_whisper_feature": True,
        }
    )
    return out


def _mean_rows(src: np.ndarray, n_rows: int, nb: int, noise: float, rng) -> np.ndarray:
    """n_rows rows of mean(src[:nb]) + noise * std(src[:nb]) * N(0, 1), fp32."""
    base = src[:nb].astype(np.float32)
    mean = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = base.std(axis=0, dtype=np.float64).astype(np.float32)
    return mean + noise * std * rng.standard_normal((n_rows, src.shape[1]), dtype=np.float32)


def _extend(src: np.ndarray, vocab: int, nb: int, noise: float, rng) -> np.ndarray:
    """src rows kept (same dtype and bits), then new mean-initialised rows up to `vocab`."""
    new = _mean_rows(src, vocab - src.shape[0], nb, noise, rng).astype(src.dtype)
    return np.concatenate([src, new], axis=0)


def _producers(
    source: common.SafetensorsSource, cfg: LlmConfig, qwen: dict, opts: InitOptions
) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """Output tensor name -> (shape, lazy producer). Every source tensor is used (checked)."""
    names = set(source.names())
    dtype = source.get("model.norm.weight").dtype  # the checkpoint's dtype (bf16 for releases)
    std = float(qwen.get("initializer_range", 0.02))
    rng = np.random.default_rng(opts.seed)
    nb, V, D = opts.num_base_tokens, cfg.vocab_size, cfg.hidden_size
    blank = nb + TEXT_BLANK
    out: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    used: set[str] = set()

    def copy(dst: str, src: str) -> None:
        if src not in names:
            raise CheckpointError(f"{source.path}: tensor {src!r} is missing")
        used.add(src)
        out[dst] = (tuple(source.shape(src)), lambda: source.get(src))

    def fresh(dst: str, shape: tuple[int, ...], fill: str) -> None:
        # Drawn in a fixed order at plan time would cost memory; seed per tensor instead.
        seed = opts.seed + 1 + len(out)

        def make() -> np.ndarray:
            if fill == "normal":
                r = np.random.default_rng(seed)
                return (std * r.standard_normal(shape, dtype=np.float32)).astype(dtype)
            return (np.ones if fill == "ones" else np.zeros)(shape, dtype)

        out[dst] = (shape, make)

    for i in range(cfg.num_hidden_layers):
        for part in _LAYER_PARTS:
            copy(f"model.layers.{i}.{part}", f"model.layers.{i}.{part}")
    copy("model.norm.weight", "model.norm.weight")
    copy("model.mimo_norm.weight", "model.norm.weight")
    for j in range(cfg.kimia_mimo_layers):
        for part in _LAYER_PARTS:
            dst = f"model.mimo_layers.{j}.{part}"
            if opts.mimo_init == "copy_top":
                src = cfg.kimia_mimo_transformer_from_layer_index + 1 + j
                copy(dst, f"model.layers.{src}.{part}")
            else:
                shape = tuple(source.shape(f"model.layers.0.{part}"))
                kind = "zeros" if part.endswith("bias") else "normal"
                fresh(dst, shape, "ones" if "layernorm" in part else kind)
    din = cfg.kimia_adaptor_input_dim
    fresh("model.vq_adaptor.layers.0.weight", (D, din), "normal")
    fresh("model.vq_adaptor.layers.0.bias", (D,), "zeros")
    fresh("model.vq_adaptor.layers.3.weight", (D, D), "normal")
    fresh("model.vq_adaptor.layers.3.bias", (D,), "zeros")
    fresh("model.vq_adaptor.layers.4.weight", (D,), "ones")
    fresh("model.vq_adaptor.layers.4.bias", (D,), "zeros")

    head_src = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
    if head_src != "lm_head.weight" and not qwen.get("tie_word_embeddings", False):
        raise CheckpointError(
            f"{source.path}: no lm_head.weight and tie_word_embeddings is not set in config.json"
        )
    used.update({"model.embed_tokens.weight", head_src})
    # Rows are drawn in this order from one generator: embed, lm_head, mimo_output.
    seeds = rng.integers(0, 2**31, size=3)

    def embed() -> np.ndarray:
        e = _extend(
            source.get("model.embed_tokens.weight"), V, nb, opts.row_noise,
            np.random.default_rng(seeds[0]),
        )  # fmt: skip
        if opts.zero_blank_embedding:
            e[blank] = 0
        return e

    def head() -> np.ndarray:
        return _extend(source.get(head_src), V, nb, opts.row_noise, np.random.default_rng(seeds[1]))

    def mimo_head() -> np.ndarray:
        src = source.get(head_src)
        r = np.random.default_rng(seeds[2])
        return _mean_rows(src, V, nb, opts.row_noise, r).astype(src.dtype)

    out["model.embed_tokens.weight"] = ((V, D), embed)
    out["lm_head.weight"] = ((V, D), head)
    out["mimo_output.weight"] = ((V, D), mimo_head)
    unused = sorted(n for n in names - used if not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointError(
            f"{source.path}: {len(unused)} Qwen tensor(s) have no place in the Kimi-Audio model: "
            f"{unused[:10]} (is this a Qwen2 checkpoint with config.json's num_hidden_layers?)"
        )
    return out


def _shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    total = 0
    for name in sorted(sizes):
        if groups[-1] and total + sizes[name] > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += sizes[name]
    return groups


def _iter_groups(groups, producers) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for i, group in enumerate(groups, 1):
        yield i, {name: producers[name][1]() for name in group}


def init_from_qwen(
    qwen_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    opts: InitOptions = InitOptions(),
    *,
    tokenizer_from: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
) -> LlmConfig:
    """Writes a Kimi-Audio LLM folder (released layout) initialised from a Qwen2 HF folder.

    Args:
      qwen_dir: HF Qwen2/Qwen2.5 folder (config.json + model.safetensors or index + shards).
      out_dir: folder to create.
      opts: the initialisation choices (see `InitOptions`).
      tokenizer_from: optional Kimi-Audio folder whose tokenizer files (tiktoken.model,
        tokenizer_config.json, tokenization_kimia.py) are copied next to the weights.
      max_shard_bytes: largest output shard (the release uses ~0.5 GB shards; any size loads).
      overwrite: replace an existing out_dir.
    Returns:
      The LlmConfig of the written checkpoint.
    """
    qwen_dir, out_dir = Path(qwen_dir), Path(out_dir)
    if not qwen_dir.is_dir():
        raise CheckpointError(f"qwen_dir {qwen_dir} is not a folder")
    if out_dir.exists():
        if not overwrite:
            raise CheckpointError(f"out_dir {out_dir} exists; pass overwrite=True to replace it")
        shutil.rmtree(out_dir)
    qwen = configs_base.read_file(qwen_dir / "config.json")
    config = kimia_config(qwen, opts, str(qwen_dir / "config.json"))
    cfg = LlmConfig.from_json(config, str(qwen_dir / "config.json"))
    source = common.SafetensorsSource(qwen_dir)
    producers = _producers(source, cfg, qwen, opts)
    dtype = source.get("model.norm.weight").dtype
    itemsize = np.dtype(dtype).itemsize
    sizes = {k: int(np.prod(shape)) * itemsize for k, (shape, _) in producers.items()}
    groups = _shard_plan(sizes, max_shard_bytes)
    from safetensors.numpy import save_file

    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map = {}
    n = len(groups)
    for i, tensors in _iter_groups(groups, producers):
        fname = f"model-{i}-of-{n}.safetensors"  # the release's naming
        for k, v in tensors.items():
            if v.shape != producers[k][0]:
                raise CheckpointError(f"internal: {k} has shape {v.shape}, not {producers[k][0]}")
            weight_map[k] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        logging.info("wrote %s (%d tensors)", fname, len(tensors))
        del tensors
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config["torch_dtype"] = "bfloat16" if dtype == ml_dtypes.bfloat16 else str(np.dtype(dtype))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_from) / f).is_file():
                shutil.copy2(Path(tokenizer_from) / f, tmp / f)
        if not (tmp / "tiktoken.model").is_file():
            raise CheckpointError(f"tokenizer_from {tokenizer_from} has no tiktoken.model")
    tmp.rename(out_dir)
    return cfg
