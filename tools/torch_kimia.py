"""A PyTorch reference of the Kimi-Audio LLM (`MoonshotKimiaForCausalLM`) built from transformers'
own Qwen2 modules, for parity checks of released-layout folders (tests, tools/bench_train.py).

    ref = TorchKimia.from_released(folder)     # the LLM safetensors of `folder`
    text_logits, audio_logits = ref(audio_ids, text_ids, positions, features, is_continuous)

The model (spec/llm.md §3): `Qwen2ForCausalLM`'s embedding, decoder layers, final norm and text
head; the MIMO branch = `kimia_mimo_layers` `Qwen2DecoderLayer`s seeded by the output of main layer
`kimia_mimo_transformer_from_layer_index`, then `mimo_norm` and `mimo_output`; the VQ adaptor
`LayerNorm(W3 silu(W0 x + b0) + b3)` (eps = rms_norm_eps) mixed in at continuous positions as
`(emb(audio) + adaptor) * sqrt(2)`, plus `emb(text)` when the row's text ids are not all zero.
Attention is causal (SDPA's `is_causal` with no mask), positions are the given ids.

The state dict uses the released tensor names (`model.layers.*`, `model.mimo_layers.*`,
`model.mimo_norm.weight`, `model.vq_adaptor.layers.{0,3,4}.*`, `lm_head.weight`,
`mimo_output.weight`), so `load_released` maps a folder 1:1 and names any tensor left over or
missing. Needs torch + transformers (test / benchmark dependencies only).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers.models.qwen2 import modeling_qwen2 as mq

IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def qwen2_config(cfg: dict[str, Any], num_layers: int | None = None) -> transformers.Qwen2Config:
    """The transformers Qwen2Config of a Kimi-Audio config.json dict (or an LlmConfig's fields);
    `num_layers` overrides the layer count (transformers 5.x indexes `layer_types` by layer)."""
    qcfg = transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"] if num_layers is None else num_layers,
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )
    rope = getattr(qcfg, "rope_parameters", None)  # transformers 5.x keeps rope_theta here
    if isinstance(rope, dict):
        rope["rope_theta"] = cfg["rope_theta"]
    return qcfg


def _hidden(out: Any) -> torch.Tensor:
    """A decoder layer's output: a tuple in transformers 4.x, the tensor in 5.x."""
    return out[0] if isinstance(out, tuple) else out


class TorchKimia(torch.nn.Module):
    """The dual-head Kimi-Audio LLM in PyTorch (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        qcfg = qwen2_config(cfg)
        self.qwen = transformers.Qwen2ForCausalLM(qcfg)
        n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
        nm = cfg["kimia_mimo_layers"]
        mcfg = qwen2_config(cfg, num_layers=n + nm)  # MIMO layer j is layer n + j of the cache
        self.mimo = torch.nn.ModuleList([mq.Qwen2DecoderLayer(mcfg, n + j) for j in range(nm)])
        self.mimo_norm = mq.Qwen2RMSNorm(h, cfg["rms_norm_eps"])
        self.mimo_output = torch.nn.Linear(h, cfg["vocab_size"], bias=False)
        din = cfg.get("kimia_adaptor_input_dim")
        self.vq_adaptor = None
        if cfg.get("use_whisper_feature", True) and din:
            self.vq_adaptor = torch.nn.Sequential(
                torch.nn.Linear(din, h, bias=True),
                torch.nn.SiLU(),
                torch.nn.Dropout(0.0),
                torch.nn.Linear(h, h, bias=True),
                torch.nn.LayerNorm(h, eps=cfg["rms_norm_eps"], bias=True),
            )

    # -- the released names -----------------------------------------------------------------------

    def released_names(self) -> dict[str, torch.nn.Parameter]:
        """released tensor name -> this module's parameter."""
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("qwen."):
                out[name[len("qwen.") :]] = p
            elif name.startswith("mimo."):
                out["model.mimo_layers." + name[len("mimo.") :]] = p
            elif name.startswith("vq_adaptor."):
                out["model.vq_adaptor.layers." + name[len("vq_adaptor.") :]] = p
            elif name.startswith("mimo_norm."):
                out["model." + name] = p
            else:
                out[name] = p
        return out

    def load_released(self, tensors: dict[str, np.ndarray]) -> None:
        """Copies every tensor (released names) into the module; raises on a tensor without a
        parameter, a parameter without a tensor, or a shape mismatch."""
        params = self.released_names()
        extra = sorted(n for n in tensors if n not in params and not IGNORED.fullmatch(n))
        missing = sorted(set(params) - set(tensors))
        if extra or missing:
            raise KeyError(
                f"released tensors without a parameter: {extra[:5]}; parameters without a "
                f"tensor: {missing[:5]}"
            )
        with torch.no_grad():
            for name, p in params.items():
                t = torch.from_numpy(np.ascontiguousarray(tensors[name]))
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))

    @classmethod
    def from_released(cls, folder: str | os.PathLike[str]) -> TorchKimia:
        """The LLM of a released-layout folder (config.json + safetensors shards), fp32, eval."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(cfg).float().eval()
        tensors: dict[str, np.ndarray] = {}
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        model.load_released({k: v.astype(np.float32) for k, v in tensors.items()})
        return model

    # -- forward ----------------------------------------------------------------------------------

    def embed(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor,
        features: torch.Tensor | None = None,
        is_continuous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.qwen.model.embed_tokens
        x = emb(audio_ids.long())
        if features is not None and self.vq_adaptor is not None:
            mixed = (x + self.vq_adaptor(features.to(x.dtype))) * math.sqrt(2.0)
            x = torch.where(is_continuous.bool()[..., None], mixed, x)
        use_text = (text_ids.long().sum(dim=1) != 0)[:, None, None]
        return torch.where(use_text, x + emb(text_ids.long()), x)

    def forward(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor,
        positions: torch.Tensor,
        features: torch.Tensor | None = None,
        is_continuous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_logits, audio_logits) [B, T, V] in fp32."""
        x = self.embed(audio_ids, text_ids, features, is_continuous)
        pos = positions.long()
        pe = self.qwen.model.rotary_emb(x, pos)
        seed_at = self.cfg["kimia_mimo_transformer_from_layer_index"]
        seed = None
        for i, layer in enumerate(self.qwen.model.layers):
            x = _hidden(layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe))
            if i == seed_at:
                seed = x
        text_logits = self.qwen.lm_head(self.qwen.model.norm(x)).float()
        m = seed
        for layer in self.mimo:
            m = _hidden(layer(m, attention_mask=None, position_ids=pos, position_embeddings=pe))
        audio_logits = self.mimo_output(self.mimo_norm(m)).float()
        return text_logits, audio_logits


__all__ = ["TorchKimia", "qwen2_config"]
