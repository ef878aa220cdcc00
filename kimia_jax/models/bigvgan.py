"""BigVGAN-v2 generator (AMPBlock1, anti-aliased Snake/SnakeBeta), twin of NVIDIA `bigvgan.BigVGAN`.

Mel [B, T, num_mels] (log-mel, channels last) -> waveform [B, T * prod(upsample_rates)].
Weight norm is folded at conversion time (`W = g V / |V|`), so params hold plain conv kernels.
The anti-aliased activation follows the torch path (`use_cuda_kernel=False`), which is the parity
reference (spec/detokenizer.md §5.4, §5.6). Layout is NWC throughout (channels last).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax.configs import BigVGANConfig  # re-exported: the config lives in kimia_jax.configs

_FILTER_TAPS = 12  # Activation1d: ratio 2, kernel_size 6 * ratio
_PAD_UP = 5  # replicate pad of the upsampler: kernel_size // ratio - 1


def kaiser_sinc_filter(
    cutoff: float = 0.25, half_width: float = 0.3, kernel_size: int = 12
) -> np.ndarray:
    """Kaiser-windowed sinc low-pass filter of alias_free_activation (spec §5.4), float32."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    delta_f = 4 * half_width
    a = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if a > 50.0:
        beta = 0.1102 * (a - 8.7)
    elif a >= 21.0:
        beta = 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta)
    time = (np.arange(-half, half) + 0.5) if even else (np.arange(kernel_size) - half)
    f = 2 * cutoff * window * np.sinc(2 * cutoff * time)
    return (f / f.sum()).astype(np.float32)


def _valid(x: jax.Array, n: jax.Array | None) -> jax.Array | None:
    """[B, T, 1] bool: frames before each row's valid length n [B] (None: all valid)."""
    if n is None:
        return None
    return (jnp.arange(x.shape[1])[None, :] < n[:, None])[:, :, None]


def _zero_tail(x: jax.Array, n: jax.Array | None) -> jax.Array:
    """Zeroes frames >= n, so a zero-padded conv sees the sequence end exactly at n."""
    return x if n is None else jnp.where(_valid(x, n), x, 0)


def _edge_tail(x: jax.Array, n: jax.Array | None) -> jax.Array:
    """Repeats frame n-1 over frames >= n, so a replicate pad sees the sequence end at n."""
    if n is None:
        return x
    last = jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None], axis=1)  # [B, 1, C]
    return jnp.where(_valid(x, n), x, last)


def _const_init(value: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.asarray(value, dtype), shape)

    return init


class AntiAliasedSnake(nn.Module):
    """Activation1d(SnakeBeta): 2x upsample (kaiser-sinc, replicate pad) -> snake -> 2x downsample.

    Depthwise with one filter shared by all channels, written as 6-tap polyphase sums of shifted
    slices (XLA fuses them into one loop; much cheaper on CPU than a grouped, dilated conv).
    """

    channels: int
    beta: bool  # snakebeta (separate beta) vs snake
    logscale: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, n: jax.Array | None = None
    ) -> jax.Array:  # [B, T, C] -> [B, T, C]
        c = self.channels
        init = nn.initializers.zeros_init() if self.logscale else nn.initializers.ones_init()
        alpha = self.param(
            "alpha", nn.with_logical_partitioning(init, ("conv_out",)), (c,), jnp.float32
        )
        beta = (
            self.param("beta", nn.with_logical_partitioning(init, ("conv_out",)), (c,), jnp.float32)
            if self.beta
            else alpha
        )
        f0 = kaiser_sinc_filter()
        up_f = self.param("upsample_filter", _const_init(f0), (_FILTER_TAPS,), jnp.float32)
        down_f = self.param("downsample_filter", _const_init(f0), (_FILTER_TAPS,), jnp.float32)
        if self.logscale:
            alpha, beta = jnp.exp(alpha), jnp.exp(beta)
        dt = x.dtype
        t = x.shape[1]
        # Up: u[2i] = 2 sum_r xp[i+2+r] f[11-2r], u[2i+1] = 2 sum_r xp[i+3+r] f[10-2r]
        # (torch: replicate pad 5, conv_transpose1d stride 2, x2, crop 15 each side).
        xp = jnp.pad(_edge_tail(x, n), ((0, 0), (_PAD_UP, _PAD_UP), (0, 0)), mode="edge")
        up2 = (2.0 * up_f).astype(dt)
        even = sum(xp[:, 2 + r : 2 + r + t] * up2[11 - 2 * r] for r in range(6))
        odd = sum(xp[:, 3 + r : 3 + r + t] * up2[10 - 2 * r] for r in range(6))
        u = jnp.stack([even, odd], axis=2).reshape(x.shape[0], 2 * t, c)
        # Snake(Beta): u + sin(a u)^2 / (b + 1e-9)
        a = alpha.astype(dt)
        inv_b = (1.0 / (beta + 1e-9)).astype(dt)
        u = u + inv_b * jnp.square(jnp.sin(u * a))
        # Down: y[n] = sum_k f[k] ap[2n+k], ap = replicate pad (5, 6) of u (length 2T+11; padded
        # to 2T+12 so it splits into even/odd phases).
        u = _edge_tail(u, None if n is None else 2 * n)
        ap = jnp.pad(u, ((0, 0), (5, 7), (0, 0)), mode="edge").reshape(x.shape[0], t + 6, 2, c)
        ph = (ap[:, :, 0], ap[:, :, 1])
        df = down_f.astype(dt)
        return sum(ph[k % 2][:, k // 2 : k // 2 + t] * df[k] for k in range(_FILTER_TAPS))


class Conv1d(nn.Module):
    """Conv1d with folded weight norm; kernel [k, in, out] (torch [out, in, k] transposed)."""

    features: int
    kernel_size: int
    dilation: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, n: jax.Array | None = None
    ) -> jax.Array:  # [B, T, Cin] -> [B, T, Cout]
        k = self.kernel_size
        x = _zero_tail(x, n)
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("kernel_w", "conv_in", "conv_out")
            ),
            (k, x.shape[-1], self.features),
            jnp.float32,
        )
        pad = self.dilation * (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x,
            w.astype(x.dtype),
            window_strides=(1,),
            padding=[(pad, pad)],
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        if self.use_bias:
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                (self.features,),
                jnp.float32,
            )
            y = y + b.astype(y.dtype)
        return y


class ConvTranspose1d(nn.Module):
    """torch ConvTranspose1d(stride u, padding (k-u)//2) -> output exactly u*T.

    Kernel [k, in, out] (torch [in, out, k] transposed, not flipped). Computed as one matmul
    [B,T,Cin] x [Cin, k*Cout] followed by an overlap-add of ceil(k/u) shifted phase blocks, so no
    zero-dilated input is ever convolved.
    """

    features: int
    kernel_size: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, n: jax.Array | None = None
    ) -> jax.Array:  # [B, T, Cin] -> [B, u*T, Cout]
        k, u = self.kernel_size, self.stride
        x = _zero_tail(x, n)
        bsz, t, cin = x.shape
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("kernel_w", "conv_in", "conv_out")
            ),
            (k, cin, self.features),
            jnp.float32,
        )
        b = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            (self.features,),
            jnp.float32,
        )
        p = (k - u) // 2
        q = -(-k // u)  # phase blocks
        wk = jnp.pad(w, ((0, q * u - k), (0, 0), (0, 0))).astype(x.dtype)  # [q*u, Cin, Cout]
        # z[b, j, m, o] = sum_i x[b, j, i] w[m, i, o]: input frame j -> output sample u*j+m.
        z = jnp.einsum("bti,mio->btmo", x, wk).reshape(bsz, t, q, u, self.features)
        full = sum(
            jnp.pad(z[:, :, a], ((0, 0), (a, q - 1 - a), (0, 0), (0, 0))) for a in range(q)
        ).reshape(bsz, (t + q - 1) * u, self.features)
        return full[:, p : p + u * t] + b.astype(x.dtype)


class AMPBlock1(nn.Module):
    """x += convs2[m](act(convs1[m](act(x)))) for m over the dilations."""

    channels: int
    kernel_size: int
    dilations: Sequence[int]
    beta: bool
    logscale: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, n: jax.Array | None = None) -> jax.Array:
        c, k = self.channels, self.kernel_size
        for m, d in enumerate(self.dilations):
            a0 = AntiAliasedSnake(
                c, self.beta, self.logscale, self.dtype, name=f"activations_{2 * m}"
            )
            a1 = AntiAliasedSnake(
                c, self.beta, self.logscale, self.dtype, name=f"activations_{2 * m + 1}"
            )
            xt = Conv1d(c, k, d, dtype=self.dtype, name=f"convs1_{m}")(a0(x, n), n)
            xt = Conv1d(c, k, 1, dtype=self.dtype, name=f"convs2_{m}")(a1(xt, n), n)
            x = x + xt
        return x


class BigVGAN(nn.Module):
    """conv_pre -> [ConvTranspose -> mean of K AMP blocks] x stages -> act -> conv_post."""

    cfg: BigVGANConfig

    @nn.compact
    def __call__(
        self, mel: jax.Array, n_frames: jax.Array | None = None, return_hidden: bool = False
    ):
        """mel [B, T, M] -> wav [B, T * hop].

        n_frames: optional [B] valid lengths. Frames past them are padding: every layer then
        treats the sequence as ending at the valid length (zero pad for convs, replicate pad for
        the anti-aliased activations), so samples before n_frames * hop equal those of the unpadded
        input. One compiled shape then serves many lengths.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        beta = cfg.activation == "snakebeta"
        n = None if n_frames is None else jnp.asarray(n_frames, jnp.int32).reshape(mel.shape[0])
        hidden = {}
        x = Conv1d(cfg.upsample_initial_channel, 7, dtype=dt, name="conv_pre")(mel.astype(dt), n)
        hidden["conv_pre"] = x
        nk = len(cfg.resblock_kernel_sizes)
        ch = cfg.upsample_initial_channel
        for s, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            ch = cfg.upsample_initial_channel // 2 ** (s + 1)
            x = ConvTranspose1d(ch, k, u, dtype=dt, name=f"ups_{s}")(x, n)
            n = None if n is None else n * u
            hidden[f"ups{s}"] = x
            xs = None
            for j, (rk, rd) in enumerate(
                zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
            ):
                y = AMPBlock1(
                    ch, rk, rd, beta, cfg.snake_logscale, dt, name=f"resblocks_{s * nk + j}"
                )(x, n)
                xs = y if xs is None else xs + y
            x = xs / nk
        hidden["stages_out"] = x
        x = AntiAliasedSnake(ch, beta, cfg.snake_logscale, dt, name="activation_post")(x, n)
        x = Conv1d(1, 7, use_bias=cfg.use_bias_at_final, dtype=dt, name="conv_post")(x, n)
        x = jnp.tanh(x) if cfg.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)
        wav = x[..., 0].astype(jnp.float32)
        return (wav, hidden) if return_hidden else wav
