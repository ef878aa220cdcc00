"""Released Kimi-Audio LLM folder (HF safetensors) -> KimiaLLM params, and loading either format.

The rule table is the whole mapping; every HF tensor is used exactly once. Weights keep the HF
[out, in] layout (see layers/linear.py), so every transform is the identity. The released index
has 34 extra bf16 `rotary_emb.inv_freq` buffers (spec/llm.md §2): they are ignored by name and
RoPE is recomputed in fp32.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from kimia_jax import checkpoint
from kimia_jax.configs import DType, LlmConfig, layout
from kimia_jax.conversion import common
from kimia_jax.conversion.common import Rule
from kimia_jax.errors import CheckpointNotFoundError, QuantizeMismatchError
from kimia_jax.layers import quant
from kimia_jax.models import kimia_llm

_LAYER_PARTS = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
)  # fmt: skip


def rules() -> tuple[Rule, ...]:
    """HF name regex -> our param path; the whole LLM mapping."""
    table = [
        Rule(r"model\.embed_tokens\.weight", "embed_tokens/weight"),
        Rule(r"model\.norm\.weight", "norm/weight"),
        Rule(r"model\.mimo_norm\.weight", "mimo_norm/weight"),
        Rule(r"lm_head\.weight", "lm_head/weight"),
        Rule(r"mimo_output\.weight", "mimo_output/weight"),
        Rule(r"model\.vq_adaptor\.layers\.(0|3|4)\.(weight|bias)", r"vq_adaptor/layers_\1/\2"),
    ]
    for stack in ("layers", "mimo_layers"):
        for part in _LAYER_PARTS:
            pattern = rf"model\.{stack}\.(\d+)\." + part.replace(".", r"\.")
            table.append(Rule(pattern, rf"{stack}_\1/" + part.replace(".", "/")))
    return tuple(table)


# Saved non-persistent RoPE buffers in the released index (spec/llm.md §2): recomputed in fp32.
IGNORE = (r".*\.rotary_emb\.inv_freq",)


def _targets(cfg: LlmConfig, mesh: Mesh | None, dtype: Any) -> dict[str, common.Target]:
    # Checkpoints hold the unrolled layout; `kimia_llm.to_layout` stacks it for scan_layers.
    unrolled = kimia_llm.abstract_params(dataclasses.replace(cfg, scan_layers=False))
    return common.targets_for(unrolled, mesh, dtype)


def _config(path: Path, dtype: str) -> LlmConfig:
    return LlmConfig.from_file(path / layout.CONFIG_JSON, dtype=dtype, param_dtype=dtype)


def load_hf(
    model_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> tuple[LlmConfig, Any]:
    """Reads a released HF folder (single or sharded safetensors) into verified, placed params.

    Args:
      model_dir: folder with config.json and model.safetensors or an index + shards.
      dtype: parameter and compute dtype ("float32" (None) or "bfloat16").
      mesh: place each tensor straight onto its shards; None = default device.
      quantize: None, "int8" or "int4": the `quant.DECODE` matrices quantized tensor by tensor
        as they are read (each from its `dtype` value, as `quant.quantize` would), so the float
        model never exists whole.
    Returns:
      (config, params) with params a nested dict matching `KimiaLLM`.
    """
    model_dir = Path(model_dir)
    dtype = DType.parse(dtype or DType.FLOAT32).value
    if not model_dir.exists():
        raise CheckpointNotFoundError(f"{model_dir} does not exist (not a checkpoint directory)")
    cfg = _config(model_dir, dtype)
    source = common.SafetensorsSource(model_dir)
    flat = common.convert(
        source,
        rules(),
        _targets(cfg, mesh, dtype),
        ignore=IGNORE,
        progress=progress,
        desc=model_dir.name,
        finish=None if quantize in (None, "none") else (
            lambda path, x: quant.quantize_leaf(path, x, quantize, modules=quant.DECODE)
        ),
    )  # fmt: skip
    return cfg, kimia_llm.to_layout(common.unflatten(flat), cfg, mesh)


def quant_meta(quantize: str | None, group: int | None = None) -> dict[str, Any]:
    """The meta-file entries of a folder whose `quant.DECODE` matrices are stored quantized."""
    if quantize is None:
        return {}
    return {"quantize": quantize, "quantize_group": group, "quantized_modules": list(quant.DECODE)}


def stored_quantization(path: str | os.PathLike[str]) -> str | None:
    """The kind ("int8" / "int4") a converted LLM folder was written with (--quantize), or None."""
    path = Path(path)
    if not checkpoint.is_orbax_dir(path):
        return None
    return checkpoint.read_meta(path).get("quantize")


def resolve_quantize(path: str | os.PathLike[str], quantize: str | None) -> str | None:
    """The weights `load(path, quantize=quantize)` gives: None (float), "int8" or "int4".

    None: as the folder stores them; "none": float (a quantized folder raises); a kind: that
    kind (quantized on load from a float folder; a quantized folder must hold that kind).
    Raises QuantizeMismatchError naming the folder, both kinds and what to do.
    """
    if quantize not in (None, "none", *quant.KINDS):
        raise ValueError(f"quantize must be None, 'none' or one of {quant.KINDS}, got {quantize!r}")
    stored = stored_quantization(path)
    if stored is None:
        return None if quantize == "none" else quantize
    if quantize in (None, stored):
        return stored
    want = "float weights" if quantize == "none" else f"{quantize} weights"
    raise QuantizeMismatchError(
        f"quantize={quantize!r}: {path} holds {stored} LLM weights (converted with "
        f"--quantize={stored}), which cannot give {want}. Pass quantize=None or {stored!r} to "
        f"load them as they are, or convert the released folder again"
        + ("" if quantize == "none" else f" with --quantize={quantize}")
        + " into another folder"
    )


def load(
    path: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> tuple[LlmConfig, Any]:
    """The LLM loader: a released HF folder or our converted Orbax directory -> (config, params).

    Args:
      path: model root (config.json + safetensors, or config.json + Orbax params/).
      dtype: parameter and compute dtype (of every float leaf); None = "float32".
      mesh: place each tensor straight onto its shards; None = the first device.
      quantize: weight-only quantization of the `quant.DECODE` matrices (`resolve_quantize`).
        None: as the folder stores them: a folder converted with --quantize restores its int8 /
        int4 weights and scales directly (no float copy of them ever exists); "int8" / "int4":
        a float folder is quantized on load (a released folder tensor by tensor as it is read,
        an Orbax one after restoring), a quantized folder must hold that kind; "none": float.
    """
    path = Path(path)
    fmt = checkpoint.detect(
        path,
        released=(layout.CONFIG_JSON, layout.SAFETENSORS, layout.SAFETENSORS_INDEX),
        what="LLM",
    )
    kind = resolve_quantize(path, quantize)
    if fmt is checkpoint.Format.ORBAX:
        dtype = DType.parse(dtype or DType.FLOAT32).value
        cfg = _config(path, dtype)
        # Checkpoints hold the unrolled layout; `to_layout` stacks it when cfg.scan_layers.
        unrolled = kimia_llm.abstract_params(dataclasses.replace(cfg, scan_layers=False))
        abstract = checkpoint.abstract_model(unrolled, mesh=mesh, dtype=dtype)
        meta = checkpoint.read_meta(path)
        stored = meta.get("quantize")
        if stored:
            modules = meta.get("quantized_modules") or quant.DECODE
            abstract = quant.abstract(abstract, stored, meta.get("quantize_group"), modules=modules)
        params = checkpoint.restore(path, abstract)
        if kind and not stored:
            params = quant.quantize(params, kind, modules=quant.DECODE, consume=True)
        return cfg, kimia_llm.to_layout(params, cfg, mesh)
    return load_hf(path, dtype=dtype, mesh=mesh, progress=progress, quantize=kind)


def convert_to_orbax(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
    quantize: str | None = None,
) -> dict[str, Any]:
    """HF folder -> Orbax directory (atomic). Returns stats: tensors, seconds, peak RSS.

    quantize: None, "int8" or "int4": store the `quant.DECODE` matrices quantized (each
    quantized from its `dtype` value as it is read; the rest in `dtype`), recorded in the meta
    file (`quant_meta`), so `load` restores them without ever holding the float weights.
    """
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    if quantize in ("none", ""):
        quantize = None
    if quantize is not None and quantize not in quant.KINDS:
        raise ValueError(f"quantize must be None or one of {quant.KINDS}, got {quantize!r}")
    rss_before = common.current_rss_mib()
    cfg, params = load_hf(hf_dir, dtype=dtype, progress=progress, quantize=quantize)
    leaves = jax.tree.leaves(params)
    n = len(leaves)
    params_mib = sum(x.nbytes for x in leaves) / 2**20
    source = common.SafetensorsSource(hf_dir)
    largest = max(source.names(), key=lambda k: int(np.prod(source.shape(k))))
    config_text = (hf_dir / layout.CONFIG_JSON).read_text()
    checkpoint.save(
        out_dir,
        params,
        files={layout.CONFIG_JSON: config_text},
        meta={
            "model": "kimia_llm",
            "source": str(hf_dir.absolute()),
            "dtype": dtype,
            **quant_meta(quantize),
        },  # fmt: skip
        overwrite=overwrite,
    )
    stats = dict(
        tensors=n,
        seconds=time.perf_counter() - t0,
        rss_before_mib=rss_before,
        params_mib=params_mib,
        largest_tensor=largest,
        largest_tensor_mib=int(np.prod(source.shape(largest))) * jnp.dtype(dtype).itemsize / 2**20,
        peak_rss_mib=common.peak_rss_mib(),
    )
    logging.info("wrote %s: %s", out_dir, stats)
    return stats


def hf_name(path: str) -> str:
    """Our param path -> released tensor name (inverse of `rules()`)."""
    parts = path.split("/")
    if parts[0] in ("lm_head", "mimo_output"):
        return ".".join(parts)
    out = []
    for p in parts:
        stack, _, idx = p.rpartition("_")
        out.extend([stack, idx] if idx.isdigit() and stack in ("layers", "mimo_layers") else [p])
    return "model." + ".".join(out)
