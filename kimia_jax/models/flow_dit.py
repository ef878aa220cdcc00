"""Flow-matching DiT of the Kimi-Audio detokenizer (twin of the official `DiTPrefix`).

A velocity field v(x_t, tokens, t) over normalized 80-bin log-mel frames. Conditioning is per
frame (adaLN driven by token embedding + timestep embedding), attention is bidirectional over a
per-layer K/V cache of committed frames plus the current chunk, with interleaved-pair RoPE applied
before caching. See spec/detokenizer.md §2.

Shapes: B batch, L frames of the current chunk, S cached frames, D hidden, N heads, H head dim,
M mel bins (80).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import DiTConfig  # re-exported: the config lives in kimia_jax.configs
from kimia_jax.layers import rope
from kimia_jax.layers.attention import AttentionMask, dot_product_attention
from kimia_jax.layers.kv_cache import KVCache
from kimia_jax.layers.linear import dense
from kimia_jax.layers.mlp import MLP
from kimia_jax.layers.norm import LayerNorm

_FREQ_EMB = 256  # TimestepEmbedder frequency_embedding_size (official default, no config key)
_LN_EPS = 1e-6


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype: Any) -> nn.Dense:
    return dense(features, axes, name, dtype)


def _layer_norm(dtype: Any) -> LayerNorm:
    """LayerNorm over the last axis, no affine, eps 1e-6, statistics in float32."""
    return LayerNorm(_LN_EPS, use_scale=False, use_bias=False, dtype=dtype)


def timestep_frequencies() -> np.ndarray:
    """f_i = exp(-ln(10000) i / 128) as the official float32 computation (spec §2.3)."""
    half = _FREQ_EMB // 2
    arg = (np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    return np.exp(arg.astype(np.float64)).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Integer timestep -> [B, D]: cat(cos, sin) of t*f, then Linear-SiLU-Linear (`t_embedder`)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:  # [B] int -> [B, D]
        freqs = jnp.asarray(timestep_frequencies())
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        dt = jnp.dtype(self.cfg.dtype)
        h = _dense(self.cfg.hidden_size, (None, "embed"), "mlp_0", dt)(emb.astype(dt))
        return _dense(self.cfg.hidden_size, ("embed", "mlp"), "mlp_2", dt)(nn.silu(h))


class Attention(nn.Module):
    """Fused qkv, RoPE, non-causal attention over [cache ; current], output projection."""

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, L, D]
        positions: jax.Array,  # [B, L]
        cache_k: jax.Array,  # [B, S, N, H] this layer's cached keys
        cache_v: jax.Array,  # [B, S, N, H]
        key_mask: jax.Array,  # [B, S + L] bool: which keys exist (valid cache, unpadded frames)
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, ln, d = x.shape
        n, hd = cfg.num_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        qkv = _dense(3 * d, ("embed", "mlp"), "qkv", dt)(x)  # [B, L, 3D]: [q ; k ; v], head-major
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, ln, n, hd) for i in range(3))
        if cfg.use_rope:
            freqs = rope.inv_freq(hd, cfg.rope_base, table_dtype="float64")
            q = rope.apply_interleaved(q, positions, freqs, cfg.rope_interpolation_factor)
            k = rope.apply_interleaved(k, positions, freqs, cfg.rope_interpolation_factor)
        keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)  # [B, S+L, N, H]
        vals = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
        # scores * hd^-0.5 in float32 as the official code; every query sees >= 1 key (its own
        # chunk's first frame), so the masked value (finfo.min vs the official -inf) never shows.
        o = dot_product_attention(
            q, keys, vals, mask=AttentionMask.make_padding(key_mask), scale=float(hd**-0.5)
        ).reshape(b, ln, d)
        return _dense(d, ("mlp", "embed"), "proj", dt)(o), k, v


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulation (shift, scale, gate) x (msa, mlp) from SiLU(c)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, c, positions, cache_k, cache_v, key_mask):
        d = self.cfg.hidden_size
        dt = jnp.dtype(self.cfg.dtype)
        mod = _dense(6 * d, ("embed", "mlp"), "adaLN_modulation_1", dt)(nn.silu(c))
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
        u = _layer_norm(dt)(x) * (1 + sc_msa) + sh_msa
        a, k, v = Attention(self.cfg, name="attn")(u, positions, cache_k, cache_v, key_mask)
        x = x + g_msa * a
        u = _layer_norm(dt)(x) * (1 + sc_mlp) + sh_mlp
        mlp = MLP(self.cfg.mlp_hidden, gated=False, activation="gelu_tanh", act_axes=None, dtype=dt,
                  name="mlp")  # fmt: skip
        x = x + g_mlp * mlp(u)
        return x, k, v


class FlowDiT(nn.Module):
    """DiTPrefix forward: (x_t, tokens, integer t, positions, K/V cache) -> (velocity, new K/V).

    The cache holds the post-RoPE keys/values of committed frames (`KVCache`, one layer per block,
    `length` valid slots per row); attention runs over its valid slots and the chunk's valid
    frames (`frame_mask`).

    Returns:
      out: [B, L, M] velocity; k, v: [depth, B, L, N, H] this call's post-RoPE keys/values (the
      caller decides whether to commit them to the cache, `KVCache.append`).
    """

    cfg: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, L, M] normalized mel state
        condition: jax.Array,  # [B, L] int token ids at the mel frame rate
        t: jax.Array,  # [B] int timesteps floor(1000 t)
        positions: jax.Array,  # [B, L] absolute frame positions
        cache: KVCache,  # depth layers, [depth, B, S, N, H]
        frame_mask: jax.Array,  # [B, L] bool: frames of this call that are keys (not padding)
        return_hidden: bool = False,
    ):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = nn.Embed(
            cfg.semantic_vocab_size + 1,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="semantic_token_embedding",
        )
        cond = emb(condition)  # [B, L, D]
        h = _dense(cfg.hidden_size, ("mel", "embed"), "input_linear", dt)(x.astype(dt))
        temb = TimestepEmbedder(cfg, name="t_embedder")(t)  # [B, D]
        c = temb[:, None, :] + cond  # per-frame conditioning
        hidden = {"input_linear": h, "t_emb": temb}
        ks, vs = [], []
        key_mask = jnp.concatenate([cache.valid(), frame_mask], axis=1)  # [B, S + L]
        for i in range(cfg.depth):  # unrolled: faster than scan for inference (perf-notes.md)
            h, k, v = DiTBlock(cfg, name=f"blocks_{i}")(
                h, c, positions, cache.k[i], cache.v[i], key_mask
            )
            hidden[f"block{i}_out"] = h
            ks.append(k)
            vs.append(v)
        out = _FinalLayer(cfg, name="final_layer")(h, c).astype(jnp.float32)
        if return_hidden:
            return out, jnp.stack(ks), jnp.stack(vs), hidden
        return out, jnp.stack(ks), jnp.stack(vs)


class _FinalLayer(nn.Module):
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = self.cfg.hidden_size
        dt = jnp.dtype(self.cfg.dtype)
        mod = _dense(2 * d, ("embed", "mlp"), "adaLN_modulation_1", dt)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)  # shift first (spec §2.6)
        u = _layer_norm(dt)(x) * (1 + scale) + shift
        return _dense(self.cfg.input_size, ("embed", "mel"), "linear", dt)(u)


def example_inputs(cfg: DiTConfig, frames: int = 2, cached: int = 2) -> tuple[Any, ...]:
    """Positional inputs of `FlowDiT` for `init` / `eval_shape`: one row, `frames` chunk frames,
    a cache of `cached` valid frames."""
    cache = KVCache.zeros(cfg.depth, 1, cached, cfg.num_heads, cfg.head_dim, jnp.float32)
    return (
        jnp.zeros((1, frames, cfg.input_size)),
        jnp.zeros((1, frames), jnp.int32),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, frames), jnp.int32),
        cache.replace(length=jnp.full((1,), cached, jnp.int32)),
        jnp.ones((1, frames), bool),
    )
