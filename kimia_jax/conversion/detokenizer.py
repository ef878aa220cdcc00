"""Converts the released detokenizer (DiT) and BigVGAN vocoder PyTorch files to Flax params.

Released layout (spec/detokenizer.md §1):
    <root>/audio_detokenizer/config.yaml  DiT config (model.dit.*, normalize_mel, mel_mean, mel_std)
    <root>/audio_detokenizer/model.pt     Lightning checkpoint {"state_dict": {"speech_model.*"},
                                           ...optimizer state...} (~19 GB for the 1.58 B DiT)
    <root>/vocoder/config.json             BigVGAN hyper-parameters
    <root>/vocoder/model.pt                {"generator": BigVGAN state dict, weight-norm g/v form}

Memory: the torch files are opened with `torch.load(mmap=True, weights_only=True)`, so tensors are
views of the mapped file and nothing is read until a tensor is converted. Only the `speech_model.*`
weights are ever touched; the optimizer moments (2/3 of the 19 GB file) are never paged in. Peak
host RSS is therefore about the kept weights' mapped pages plus the converted arrays.

Run:
    python -m kimia_jax.conversion.detokenizer --src=/path/Kimi-Audio-7B-Instruct --dst=/path/detok
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimia_jax import checkpoint
from kimia_jax.configs import BigVGANConfig, DetokenizerConfig, DiTConfig, DType, layout
from kimia_jax.conversion import common
from kimia_jax.conversion.common import Rule
from kimia_jax.errors import CheckpointError
from kimia_jax.models.bigvgan import BigVGAN, kaiser_sinc_filter
from kimia_jax.models.flow_dit import FlowDiT, example_inputs

DIT_RULES = [
    Rule(r"semantic_token_embedding\.weight", "semantic_token_embedding/embedding"),
    Rule(r"input_linear\.weight", "input_linear/kernel", common.linear),
    Rule(r"input_linear\.bias", "input_linear/bias"),
    Rule(r"t_embedder\.mlp\.(0|2)\.weight", r"t_embedder/mlp_\1/kernel", common.linear),
    Rule(r"t_embedder\.mlp\.(0|2)\.bias", r"t_embedder/mlp_\1/bias"),
    Rule(r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"blocks_\1/attn/\2/kernel", common.linear),
    Rule(r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"blocks_\1/attn/\2/bias"),
    Rule(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"blocks_\1/mlp/\2/kernel", common.linear),
    Rule(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"blocks_\1/mlp/\2/bias"),
    Rule(
        r"blocks\.(\d+)\.adaLN_modulation\.1\.weight",
        r"blocks_\1/adaLN_modulation_1/kernel",
        common.linear,
    ),
    Rule(r"blocks\.(\d+)\.adaLN_modulation\.1\.bias", r"blocks_\1/adaLN_modulation_1/bias"),
    Rule(
        r"final_layer\.adaLN_modulation\.1\.weight",
        "final_layer/adaLN_modulation_1/kernel",
        common.linear,
    ),
    Rule(r"final_layer\.adaLN_modulation\.1\.bias", "final_layer/adaLN_modulation_1/bias"),
    Rule(r"final_layer\.linear\.weight", "final_layer/linear/kernel", common.linear),
    Rule(r"final_layer\.linear\.bias", "final_layer/linear/bias"),
]
# Dummy buffer of the sincos position embedding (no weights); rejected by DiTConfig anyway.
DIT_IGNORE = [r"position_embedding\._float_tensor"]


def _filter(w: np.ndarray) -> np.ndarray:
    """Anti-alias filter buffer [1, 1, 12] -> [12] (values checked by `CheckedFilters`)."""
    return w.reshape(-1)


class CheckedFilters:
    """Checks every stored anti-alias filter against the recomputed kaiser-sinc (spec §5.4)."""

    def __init__(self, inner: common.TensorSource):
        self.inner = inner

    def names(self) -> list[str]:
        return self.inner.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def get(self, name: str) -> np.ndarray:
        w = self.inner.get(name)
        if name.endswith(".filter"):
            f = np.asarray(w, np.float32).reshape(-1)
            ref = kaiser_sinc_filter()
            if f.shape != ref.shape or np.max(np.abs(f - ref)) > 1e-6:
                raise CheckpointError(
                    f"anti-alias filter {name!r} = {f.tolist()} differs from the kaiser-sinc "
                    "filter "
                    f"{ref.tolist()} by more than 1e-6"
                )
        return w


VOCODER_RULES = [
    Rule(r"conv_pre\.weight", "conv_pre/kernel", common.conv1d),
    Rule(r"conv_pre\.bias", "conv_pre/bias"),
    Rule(r"ups\.(\d+)\.0\.weight", r"ups_\1/kernel", common.conv_transpose1d),
    Rule(r"ups\.(\d+)\.0\.bias", r"ups_\1/bias"),
    Rule(
        r"resblocks\.(\d+)\.convs(1|2)\.(\d+)\.weight",
        r"resblocks_\1/convs\2_\3/kernel",
        common.conv1d,
    ),
    Rule(r"resblocks\.(\d+)\.convs(1|2)\.(\d+)\.bias", r"resblocks_\1/convs\2_\3/bias"),
    Rule(
        r"resblocks\.(\d+)\.activations\.(\d+)\.act\.(alpha|beta)",
        r"resblocks_\1/activations_\2/\3",
    ),
    Rule(
        r"resblocks\.(\d+)\.activations\.(\d+)\.upsample\.filter",
        r"resblocks_\1/activations_\2/upsample_filter",
        _filter,
    ),
    Rule(
        r"resblocks\.(\d+)\.activations\.(\d+)\.downsample\.lowpass\.filter",
        r"resblocks_\1/activations_\2/downsample_filter",
        _filter,
    ),
    Rule(r"activation_post\.act\.(alpha|beta)", r"activation_post/\1"),
    Rule(r"activation_post\.upsample\.filter", "activation_post/upsample_filter", _filter),
    Rule(
        r"activation_post\.downsample\.lowpass\.filter",
        "activation_post/downsample_filter",
        _filter,
    ),
    Rule(r"conv_post\.weight", "conv_post/kernel", common.conv1d),
    Rule(r"conv_post\.bias", "conv_post/bias"),
]


# ----------------------------------------------------------------------------------------------
# Sources


class TorchStateDictSource:
    """Tensors of one entry of a torch checkpoint (e.g. `["state_dict"]`), memory-mapped, lazy.

    Args:
      path: the `.pt` file.
      entry: top-level key holding the state dict ("state_dict" / "generator").
      contains: keep only keys containing this substring, and strip `strip` from them (the official
        DiT loader keeps keys containing "speech_model" and removes "speech_model.").
    """

    def __init__(
        self, path: str | os.PathLike[str], entry: str, contains: str = "", strip: str = ""
    ):
        import torch  # conversion-only dependency

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read torch checkpoint ({e})") from e
        if not isinstance(ckpt, Mapping) or entry not in ckpt:
            keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise CheckpointError(f"{path}: no {entry!r} entry (top level: {keys})")
        self.path = path
        self._t = {}
        for k, v in ckpt[entry].items():
            if contains and contains not in k:
                continue
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(
                    f"{path}: {entry}[{k!r}] is a {type(v).__name__}, not a tensor"
                )
            self._t[k.replace(strip, "") if strip else k] = v
        del ckpt  # drops the references to optimizer-state views: never paged in

    def names(self) -> list[str]:
        return sorted(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._t[name]
        if t.dtype == torch.bfloat16:
            return t.float().numpy()
        return t.numpy()  # a view of the mapped file: no copy until the transform/placement


class WeightNormFolded:
    """Presents `X.weight = g * v / |v|` (norm over all axes but 0) for every `X.weight_g/_v` pair.

    Works for Conv1d ([out, in, k], per output channel) and ConvTranspose1d ([in, out, k], per input
    channel): torch's weight_norm default dim=0 is the first axis in both cases (spec §5.5).
    """

    def __init__(self, inner: common.TensorSource):
        self.inner = inner
        names = set(inner.names())
        self._folded: dict[str, tuple[str, str]] = {}
        for n in sorted(names):
            if n.endswith(".weight_v"):
                base = n[: -len(".weight_v")]
                g = base + ".weight_g"
                if g not in names:
                    raise CheckpointError(f"{n!r} has no matching {g!r}")
                self._folded[base + ".weight"] = (g, n)
            elif n.endswith(".weight_g") and n[: -len("_g")] + "_v" not in names:
                raise CheckpointError(f"{n!r} has no matching weight_v")
        used = {x for pair in self._folded.values() for x in pair}
        self._plain = sorted(names - used)

    def names(self) -> list[str]:
        return sorted([*self._plain, *self._folded])

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._folded:
            g, v = self._folded[name]
            gs, vs = self.inner.shape(g), self.inner.shape(v)
            if len(gs) != len(vs) or gs[0] != vs[0] or any(d != 1 for d in gs[1:]):
                raise CheckpointError(
                    f"weight norm {g!r} has shape {gs}, incompatible with {v!r} {vs}"
                )
            return vs
        return self.inner.shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._folded:
            return self.inner.get(name)
        g_name, v_name = self._folded[name]
        self.shape(name)  # validates g against v
        v = np.asarray(self.inner.get(v_name), np.float64)
        g = np.asarray(self.inner.get(g_name), np.float64)
        norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
        return (v * (g / norm)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Configs


def read_vocoder_config(path: str | os.PathLike[str]) -> BigVGANConfig:
    """vocoder/config.json -> BigVGANConfig (errors name the file)."""
    return BigVGANConfig.from_file(path)


# ----------------------------------------------------------------------------------------------
# Abstract trees and conversion


def dit_abstract(cfg: DiTConfig) -> Any:
    """Unboxed param ShapeDtypeStructs of FlowDiT (and the boxed tree for shardings)."""
    m = FlowDiT(cfg)
    args = example_inputs(cfg)
    boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), *args)["params"])
    return boxed


def vocoder_abstract(cfg: BigVGANConfig) -> Any:
    m = BigVGAN(cfg)
    return jax.eval_shape(
        lambda: m.init(jax.random.key(0), jnp.zeros((1, 4, cfg.num_mels)))["params"]
    )


def convert_dit(
    source: common.TensorSource,
    cfg: DiTConfig,
    *,
    dtype: Any = jnp.float32,
    mesh=None,
    progress: bool = False,
) -> dict[str, Any]:
    """DiT state dict (prefix already stripped) -> nested Flax params."""
    boxed = dit_abstract(cfg)
    targets = common.targets_for(boxed, mesh, dtype)
    flat = common.convert(
        source, DIT_RULES, targets, ignore=DIT_IGNORE, progress=progress, desc="DiT"
    )
    return common.unflatten(flat)


def convert_vocoder(
    source: common.TensorSource,
    cfg: BigVGANConfig,
    *,
    dtype: Any = jnp.float32,
    mesh=None,
    progress: bool = False,
) -> dict[str, Any]:
    """BigVGAN generator state dict (weight-norm g/v form) -> nested Flax params, norm folded."""
    boxed = vocoder_abstract(cfg)
    targets = common.targets_for(boxed, mesh, dtype)
    flat = common.convert(
        CheckedFilters(WeightNormFolded(source)),
        VOCODER_RULES,
        targets,
        progress=progress,
        desc="vocoder",
    )
    return common.unflatten(flat)


def abstract(cfg: DetokenizerConfig) -> dict[str, Any]:
    """Boxed abstract params {"dit", "vocoder"} (what both layouts are loaded into)."""
    return {"dit": dit_abstract(cfg.dit), "vocoder": vocoder_abstract(cfg.vocoder)}


def _released_params(
    root: Path, cfg: DetokenizerConfig, *, dtype: Any, mesh: Any, progress: bool
) -> dict[str, Any]:
    """The released torch files -> params {"dit", "vocoder"}. Needs torch (imported lazily)."""
    dit_src = TorchStateDictSource(
        root / layout.DIT_DIR / layout.TORCH_WEIGHTS,
        layout.DIT_STATE_DICT_ENTRY,
        layout.DIT_KEY_PREFIX.rstrip("."),
        layout.DIT_KEY_PREFIX,
    )
    dit = convert_dit(dit_src, cfg.dit, dtype=dtype, mesh=mesh, progress=progress)
    del dit_src
    voc_src = TorchStateDictSource(
        root / layout.VOCODER_DIR / layout.TORCH_WEIGHTS, layout.VOCODER_STATE_DICT_ENTRY
    )
    voc = convert_vocoder(voc_src, cfg.vocoder, dtype=dtype, mesh=mesh, progress=progress)
    return {"dit": dit, "vocoder": voc}


def load(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    mesh: Any = None,
    progress: bool = False,
) -> tuple[DetokenizerConfig, dict[str, Any]]:
    """The detokenizer loader (DiT + vocoder) -> (DetokenizerConfig, {"dit", "vocoder"} params).

    Args:
      path: the released model root (`audio_detokenizer/` + `vocoder/`, torch files: converting
        them needs torch), our converted Orbax directory, or a converted model root holding it
        as `detokenizer/`.
      dtype: parameter and compute dtype of both models; None = "float32".
      mesh: place each tensor straight onto its shards; None = the first device.
    """
    path = Path(path)
    if checkpoint.is_orbax_dir(path / layout.DETOKENIZER_DIR):
        path = path / layout.DETOKENIZER_DIR
    fmt = checkpoint.detect(path, released=(layout.DIT_DIR, layout.VOCODER_DIR), what="detokenizer")
    dtype = DType.parse(dtype or DType.FLOAT32).value
    if fmt is checkpoint.Format.ORBAX:
        cfg = DetokenizerConfig.from_converted(path)
        params = checkpoint.restore_model(path, abstract(cfg), mesh=mesh, dtype=dtype)
    else:
        cfg = DetokenizerConfig.from_released(path)
        params = _released_params(path, cfg, dtype=dtype, mesh=mesh, progress=progress)
    return cfg.with_dtype(dtype), params


def convert_released(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Released folder -> Orbax dir (float32 params, both configs copied verbatim)."""
    src = Path(src)
    _, params = load(src, progress=True)
    files = {
        layout.DIT_CONFIG: (src / layout.DIT_DIR / layout.DIT_CONFIG).read_text(),
        layout.VOCODER_CONFIG_CONVERTED: (
            src / layout.VOCODER_DIR / layout.VOCODER_CONFIG
        ).read_text(),
    }
    return checkpoint.save(
        dst,
        params,
        files=files,
        meta={
            "source": str(src),
            "model": "detokenizer",
            "dtype": "float32",
            "peak_rss_mib": round(common.peak_rss_mib()),
        },
        overwrite=overwrite,
    )


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    out = convert_released(f.src, f.dst, overwrite=f.overwrite)
    print(f"wrote {out}; peak RSS {common.peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("src", None, "released model root (holds audio_detokenizer/ and vocoder/)")
    flags.DEFINE_string("dst", None, "output Orbax directory")
    flags.DEFINE_bool("overwrite", False, "replace dst if it exists")
    flags.mark_flags_as_required(["src", "dst"])
    app.run(main)
