"""PyTorch reference of the Kimi-Audio detokenizer (test/bench only; imports torch).

The official code (MoonshotAI/Kimi-Audio `kimia_infer/models/detokenizer`) is not installable (it
needs flash-attn and CUDA, and hard-codes bfloat16). This is a float32 re-statement of it written
from spec/detokenizer.md, with the official module/state-dict names, its chunk loop
(`KimiAudio.detokenize_audio` -> `detokenize_streaming`), the torchdyn fixed-step Euler recurrence,
the flash-attn varlen call replaced by an exact non-causal SDPA over [cache ; chunk], and
NVIDIA's pip `bigvgan` (use_cuda_kernel=False) as the vocoder. It is validated against the
official fixtures in tests/detokenizer/torch_reference_test.py (wav max abs < 1e-5).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, freqs_cis, cache):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k = _rope(q, freqs_cis), _rope(k, freqs_cis)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=1)
            v = torch.cat([cache[1], v], dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(b, n, d)), (k, v)


def _rope(x, freqs_cis):  # interleaved pairs as complex numbers, float32
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, :, None, :]).flatten(3).type_as(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, freqs_cis, cache):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        a, kv = self.attn(self.norm1(x) * (1 + sc1) + sh1, freqs_cis, cache)
        x = x + g1 * a
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x, kv


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiTPrefix(nn.Module):
    """Official `DiTPrefix` (ffn_type vanilla_mlp, use_rope, position_embedding_type skip)."""

    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d, h = c["hidden_size"], c["num_heads"]
        self.semantic_token_embedding = nn.Embedding(c["semantic_vocab_size"] + 1, d)
        self.input_linear = nn.Linear(c["input_size"], d)
        self.t_embedder = TimestepEmbedder(d)
        self.blocks = nn.ModuleList(
            [Block(d, h, c.get("mlp_ratio", 4.0)) for _ in range(c["depth"])]
        )
        self.final_layer = FinalLayer(d, c["input_size"])
        rp = c.get("rope_params", {})
        hd = d // h
        theta = 1.0 / (
            rp.get("rope_base", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)
        )
        pos = torch.arange(rp.get("max_position_embeddings", 4096)).float() / rp.get(
            "rope_interpolation_factor", 1.0
        )
        freqs = torch.outer(pos, theta)
        self.register_buffer(
            "freqs_cis",
            torch.polar(torch.ones_like(freqs), freqs)[: c.get("max_seq_len", 4096)],
            persistent=False,
        )

    def forward(self, x, position_ids, t, condition, cache=None):
        c = self.t_embedder(t)[:, None, :] + self.semantic_token_embedding(condition)
        h = self.input_linear(x)
        fc = self.freqs_cis[position_ids]
        new = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk(h, c, fc, None if cache is None else cache[i])
            new.append(kv)
        return self.final_layer(h, c), new


def import_bigvgan():
    if "matplotlib" not in sys.modules:  # pip bigvgan's utils imports it for plotting only
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            m = types.ModuleType("matplotlib")
            m.use = lambda *a, **k: None
            sys.modules["matplotlib"] = m
            sys.modules["matplotlib.pylab"] = types.ModuleType("matplotlib.pylab")
    import bigvgan

    return bigvgan


class TorchDetokenizer:
    """Official chunk loop in float32 (look-ahead 12, max KV 900, 30 linspace points, stitching)."""

    def __init__(
        self,
        dit: DiTPrefix,
        vocoder: nn.Module,
        mel_mean: float,
        mel_std: float,
        *,
        look_ahead_tokens: int = 12,
        ode_steps: int = 30,
        max_kv: int = 900,
        max_pos: int = 4096,
    ):
        self.dit, self.vocoder = dit.eval(), vocoder.eval()
        self.snapshot = None  # (cache, start) after `prefill`: the position-overflow reset
        self.mean, self.std = mel_mean, mel_std
        self.la_tokens, self.ode_steps, self.max_kv, self.max_pos = (
            look_ahead_tokens,
            ode_steps,
            max_kv,
            max_pos,
        )
        self.clear_states()

    @classmethod
    def from_released(cls, root: str | Path, **kw) -> TorchDetokenizer:
        import yaml

        root = Path(root)
        y = yaml.safe_load((root / "audio_detokenizer" / "config.yaml").read_text())
        dit = DiTPrefix(y["model"]["dit"])
        sd = torch.load(root / "audio_detokenizer" / "model.pt", weights_only=True, mmap=True)[
            "state_dict"
        ]
        dit.load_state_dict(
            {k.replace("speech_model.", ""): v for k, v in sd.items() if "speech_model" in k}
        )
        bigvgan = import_bigvgan()
        h = bigvgan.env.AttrDict(json.loads((root / "vocoder" / "config.json").read_text()))
        voc = bigvgan.BigVGAN(h, use_cuda_kernel=False)
        voc.load_state_dict(
            torch.load(root / "vocoder" / "model.pt", weights_only=True, mmap=True)["generator"]
        )
        out = cls(dit, voc, float(y.get("mel_mean", 0.0)), float(y.get("mel_std", 1.0)), **kw)
        out.h = h
        return out

    def clear_states(self):
        self.cache = None
        self.start = 0
        self.carry = None
        self.pre_mel = None
        self.pre_wav = None

    def _dit(self, x, tokens, t_float, cache):
        t = (t_float * 1000).long().reshape(1)
        pos = (self.start + torch.arange(x.shape[0]))[None]
        out, kv = self.dit(x[None], pos, t, tokens[None], cache)
        return out[0], kv

    @torch.no_grad()
    def detokenize_streaming(
        self, tokens: torch.Tensor, noise: torch.Tensor, is_final: bool
    ) -> torch.Tensor:
        u = tokens.repeat_interleave(4)
        s = u if self.carry is None else torch.cat([self.carry, u])
        n = len(s)
        la = 0 if is_final else self.la_tokens * 4
        x = noise
        t_span = torch.linspace(0, 1, self.ode_steps)
        t, dt = t_span[0], t_span[1] - t_span[0]
        kv = None
        for step in range(1, len(t_span)):  # torchdyn fixed-step Euler
            v, kv = self._dit(x, s, t, self.cache)
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        if la > 0:
            m = x[: n - la]
            self.carry = s[n - la :]
            _, kv = self._dit(m, s[: n - la], torch.tensor(0.999), self.cache)
        else:
            m = x
        self.cache = [(k[:, -self.max_kv :], v[:, -self.max_kv :]) for k, v in kv]
        mel = m * self.std + self.mean
        self.start += len(m)
        if not is_final and self.start + 2 * len(m) > self.max_pos:
            self.cache, self.start = self.snapshot or (None, 0)
        return self._stitch(mel, is_final)

    @torch.no_grad()
    def prefill(
        self, wav24k: np.ndarray, tokens: np.ndarray, chunk_size: int = 150, max_chunks: int = 10
    ) -> None:
        """Official `prefill` (spec §4.6) for 12.5 Hz tokens (repeated 4x to the mel rate): pip
        bigvgan's `mel_spectrogram` of the clip, zero-padded / cut to the T token frames; the
        first T - n * chunk frames, then n = min(T // chunk, max_chunks) chunks, each one DiT
        forward at t = 0.999 on the clean normalized mel whose K/V are committed (last 900)."""
        from bigvgan.meldataset import mel_spectrogram

        h = self.h
        y = torch.from_numpy(np.asarray(wav24k, np.float32).reshape(1, -1))
        mel = mel_spectrogram(y, h.n_fft, h.num_mels, h.sampling_rate, h.hop_size,
                              h.win_size, h.fmin, h.fmax)[0].T  # [T', 80]  # fmt: skip
        s = torch.from_numpy(np.asarray(tokens).reshape(-1).astype(np.int64)).repeat_interleave(4)
        t = len(s)
        full = torch.zeros(t, mel.shape[1])
        full[: min(t, len(mel))] = mel[:t]
        x = (full - self.mean) / self.std
        n = min(t // chunk_size, max_chunks)
        r = t - n * chunk_size
        bounds = [0, r] + [r + (i + 1) * chunk_size for i in range(n)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b == a:
                continue
            _, kv = self._dit(x[a:b], s[a:b], torch.tensor(0.999), self.cache)
            self.cache = [(k[:, -self.max_kv :], v[:, -self.max_kv :]) for k, v in kv]
            self.start += b - a
        self.snapshot = (self.cache, self.start)
        self.mel = mel

    def _decode(self, mel):
        return self.vocoder(mel.T[None])[0]  # [1, T*480]

    def _stitch(self, mel, is_final):
        if self.pre_mel is None:
            wav = self._decode(mel)
            if is_final:
                self.clear_states()
                return wav
            n = len(mel)
            self.pre_wav, self.pre_mel = wav[:, -480 * n // 2 :], mel[-n // 2 :]
            return wav[:, : 480 * n // 2]
        wav = self._decode(torch.cat([self.pre_mel, mel]))
        if is_final:
            self.clear_states()
            return wav
        p = self.pre_wav.shape[1]
        g = 2 * p if wav.shape[1] > 2 * p else wav.shape[1] // 2
        win = torch.hamming_window(g)
        out = wav[:, :g].clone()
        out[:, : g // 2] = (
            self.pre_wav[:, : g // 2] * win[-(g // 2) :] + wav[:, : g // 2] * win[: g // 2]
        )
        r = wav.shape[1] - g
        self.pre_wav, self.pre_mel = wav[:, -r:], mel[-(r // 480) :]
        return out

    def detokenize_audio(
        self, tokens: np.ndarray, noise: list[np.ndarray], on_chunk=None, prompt=None
    ) -> np.ndarray:
        """`KimiAudio.detokenize_audio`: first chunk 30 tokens, then chunks of 30; with
        `prompt=(wav24k, tokens)`, after the voice-prompt `prefill`."""
        from kimia_jax.detokenizer import plan_chunks  # pure numpy helper, no JAX work

        self.clear_states()
        self.snapshot = None
        if prompt is not None:
            self.prefill(*prompt)
        tok = torch.from_numpy(np.asarray(tokens).reshape(-1).astype(np.int64))
        out = []
        for i, (s, e, fin) in enumerate(plan_chunks(len(tok))):
            out.append(
                self.detokenize_streaming(
                    tok[s:e], torch.from_numpy(np.asarray(noise[i], np.float32)), fin
                )
            )
            if on_chunk is not None:
                on_chunk(i)
        return torch.cat(out, dim=1)[0].numpy()
