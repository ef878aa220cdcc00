"""The compiled train step: Whisper encoder on the row's waveform windows, the dual-head LLM, the
two-stream loss, gradients, clipping and AdamW, under one `jit` with the params, optimizer state
and batch sharded by logical axis names over the (data, fsdp, tensor) mesh (training.md §5.5).

* Whisper inside the step: `whisper_wav` [B, W, 480000] (float32, or int16 scaled by 1/32768) ->
  reflect-centered log-mel (`audio.mel.log_mel`, full 30 s windows as the official continuous path)
  -> `WhisperEncoder` -> [B, W * 375, 4 d_model] feature rows -> gathered to positions by
  `cont_src`. Frozen: the encoder's output is `stop_gradient`ed, no gradient is computed for it,
  and its optimizer group is `set_to_zero` (no update, no decay). Trainable: full backward, own
  AdamW group with fresh moments (`TrainStep.unfreeze_whisper`).
* Loss: `loss.head_cross_entropy` (chunked fp32 CE from the final hidden states) and
  `loss.kimia_loss` (official per-stream masked means by default). With `LossConfig.sparse` (the
  default) the CE runs only at masked positions (`loss.masked_head_cross_entropy`) and a
  micro-batch without any audio loss position skips the MIMO layers (`KimiaLLM(audio_branch=)`,
  a run-time `cond`): an ASR batch spends nothing on the audio branch and the text head only at
  its transcript positions, with the dense path's loss and gradients.
* Gradient accumulation: a batch with a leading micro-batch axis [A, B, ...] is scanned; every
  micro-batch is normalized by the counts of the whole batch, so the accumulated gradient is the
  gradient of the whole batch's loss.
* Precision: parameters (and Adam moments) stay in their stored dtype (fp32 master weights);
  `compute_dtype="bfloat16"` runs matmuls/activations in bf16 with fp32 softmax, norms and CE.
* Packed rows: `segment_ids` / `positions` of the batch (`examples.row_arrays`); the loss and its
  per-example metrics use the segment ids; attention isolation needs the LLM's segment-id mask
  (`TrainStep` refuses packed batches when the model has none, see `supports_segments`).
* Attention of training rows: the LLM runs with `causal_by_index` (mask = key index <= query
  index within equal segment ids), the static structure the fused kernels take (splash on TPU,
  cuDNN on GPU; `LlmConfig.attention_implementation` forces one). It equals the positions mask
  because positions strictly increase along each row within each segment: `examples.row_arrays`
  writes arange per example, and `TrainStep` checks every host (numpy) batch (`check_positions`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kimia_jax import sharding
from kimia_jax.audio import mel as mel_lib
from kimia_jax.configs import LlmConfig
from kimia_jax.errors import KimiaError
from kimia_jax.models import kimia_llm
from kimia_jax.models import whisper_encoder as wenc
from kimia_jax.models.kimia_llm import KimiaLLM
from kimia_jax.models.whisper_encoder import WhisperConfig, WhisperEncoder
from kimia_jax.training import optim
from kimia_jax.training.examples import ROWS_PER_WINDOW, WINDOW_SAMPLES
from kimia_jax.training.loss import (
    LossConfig,
    denominators,
    head_cross_entropy,
    kimia_loss,
    masked_head_cross_entropy,
)

# Logical axes of every batch entry (a leading micro-batch axis gets None).
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "audio_ids": ("batch", "length"),
    "text_ids": ("batch", "length"),
    "audio_labels": ("batch", "length"),
    "text_labels": ("batch", "length"),
    "positions": ("batch", "length"),
    "segment_ids": ("batch", "length"),
    "cont_src": ("batch", "length"),
    "is_continuous": ("batch", "length"),
    "audio_loss_mask": ("batch", "length"),
    "text_loss_mask": ("batch", "length"),
    "loss_weight": ("batch", "length"),
    "whisper_wav": ("batch", None, None),
    "whisper_keep": ("batch", None),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything static about the step.

    Attributes:
      optim: optimizer and schedule; loss: reduction and CE chunking.
      compute_dtype: "float32" or "bfloat16" (parameters keep their own dtype: fp32 master).
      packed: batches carry several examples per row (needs the LLM's segment-id attention).
      scan_layers: LLM layer stacks as one `nn.scan` each (one compiled layer per stack: faster
        compiles for deep models) instead of unrolled; None keeps the LlmConfig's. Params are
        converted to the layout on `init` (`kimia_llm.to_layout`); the state keeps it.
      remat_policy: LLM per-layer rematerialization, a name of `kimia_llm.REMAT_POLICIES`
        ("none", "full", "dots_saveable", ...); None keeps the LlmConfig's.
      whisper_remat_policy: the Whisper encoder's per-layer remat (same names). Only the trained
        phase differentiates through the encoder; "full" keeps one [B*W, 1500, d_model] residual
        per layer instead of every layer's attention and MLP activations.
    """

    optim: optim.OptimConfig = dataclasses.field(default_factory=optim.OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    compute_dtype: str = "float32"
    packed: bool = False
    scan_layers: bool | None = None
    remat_policy: str | None = None
    whisper_remat_policy: str = "full"

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}"
            )
        for name in ("remat_policy", "whisper_remat_policy"):
            value = getattr(self, name)
            if value is not None and value not in kimia_llm.REMAT_POLICIES:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {sorted(kimia_llm.REMAT_POLICIES)}, "
                    f"got {value!r}"
                )

    def llm_overrides(self) -> dict[str, Any]:
        """The LlmConfig fields this config sets (compute dtype, layer layout, remat)."""
        out: dict[str, Any] = {"dtype": self.compute_dtype}
        if self.scan_layers is not None:
            out["scan_layers"] = self.scan_layers
        if self.remat_policy is not None:
            out["remat_policy"] = self.remat_policy
        return out


@flax.struct.dataclass
class TrainState:
    """step, params {"llm", "whisper"}, optimizer state; the Whisper phase is static."""

    step: jax.Array
    params: Any
    opt_state: Any
    whisper_trainable: bool = flax.struct.field(pytree_node=False, default=True)


def check_positions(batch: dict[str, Any]) -> None:
    """Raises `KimiaError` unless `positions` strictly increase along each row within each segment.

    That is the contract under which the train step's index-causal attention mask equals the
    causal mask by positions (rows from `examples.row_arrays` hold arange per packed example and
    the padding continues the row index). Checked on host (numpy) batches; device arrays are
    taken as they are.
    """
    pos = batch.get("positions")
    if not isinstance(pos, np.ndarray):
        return
    t = pos.shape[-1]
    pos = pos.reshape(-1, t)
    seg = batch.get("segment_ids")
    seg = np.zeros_like(pos) if seg is None else np.asarray(seg).reshape(-1, t)
    order = np.argsort(seg, axis=-1, kind="stable")  # each segment's indices in row order
    ps, ss = np.take_along_axis(pos, order, -1), np.take_along_axis(seg, order, -1)
    bad = (ss[:, 1:] == ss[:, :-1]) & (ps[:, 1:] <= ps[:, :-1])
    if bad.any():
        r, j = np.argwhere(bad)[0]
        i0, i1 = order[r, j], order[r, j + 1]
        raise KimiaError(
            f"batch['positions'] row {r} (flattened): position {ps[r, j + 1]} at index {i1} "
            f"follows position {ps[r, j]} at index {i0} in segment {ss[r, j]}; training rows "
            "need positions that strictly increase along the row within each segment (arange "
            "per packed example, as training.examples.row_arrays builds them), because the "
            "train step's attention mask is causal by index"
        )


def supports_segments() -> bool:
    """Whether `KimiaLLM.__call__` takes `segment_ids` (attention within packed examples)."""
    return "segment_ids" in inspect.signature(KimiaLLM.__call__).parameters


# ----------------------------------------------------------------------------------------------
# forward


def whisper_features(
    params: Any, wav: jax.Array, cont_src: jax.Array, cfg: WhisperConfig
) -> jax.Array:
    """[B, W, 480000] windows -> per-position features [B, T, 4 d_model] (zeros where cont_src<0).

    Each window is zero-padded to 30 s (host), reflect-centered and log-mel'd over all 3000 frames
    (official continuous path), encoded, and viewed as 375 rows of 4 frames. A batch without
    windows (W = 0: text-only rows, every `cont_src` < 0) gives zero features and runs no encoder.
    """
    b, w, s = wav.shape
    if s != WINDOW_SAMPLES:
        raise ValueError(f"whisper_wav windows must have {WINDOW_SAMPLES} samples, got {s}")
    if w == 0:  # static: nothing to encode or gather from (cont_src is all -1 in such rows)
        return jnp.zeros((*cont_src.shape, 4 * cfg.d_model), jnp.float32)
    x = wav.reshape(b * w, s)
    x = x.astype(jnp.float32) / 32768.0 if x.dtype == jnp.int16 else x.astype(jnp.float32)
    pad = mel_lib.N_FFT // 2
    centered = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    frames = s // mel_lib.HOP
    mel = mel_lib.log_mel(centered, jnp.full((b * w,), frames, jnp.int32))  # [B*W, 128, 3000]
    h = WhisperEncoder(cfg).apply({"params": params}, mel)  # [B*W, 1500, D] fp32
    rows = h.reshape(b, w * ROWS_PER_WINDOW, 4 * cfg.d_model)
    idx = jnp.maximum(cont_src, 0)[..., None]
    feats = jnp.take_along_axis(rows, idx, axis=1)
    return jnp.where((cont_src >= 0)[..., None], feats, 0.0)


def forward_loss(
    params: Any,
    batch: dict[str, jax.Array],
    denoms: dict[str, jax.Array],
    *,
    llm_cfg: LlmConfig,
    whisper_cfg: WhisperConfig,
    loss_cfg: LossConfig,
    whisper_trainable: bool,
    collect: bool = False,
    causal_by_index: bool = True,
) -> tuple[jax.Array, dict[str, Any]]:
    """Loss of one (micro-)batch [B, ...] against the global `denoms`; metrics in aux.

    causal_by_index: the attention mask by index and segment ids (the step's; needs
    `check_positions`), or False: by positions (the reference the tests compare it with).
    """
    wp = params["whisper"] if whisper_trainable else jax.lax.stop_gradient(params["whisper"])
    feats = whisper_features(wp, batch["whisper_wav"], batch["cont_src"], whisper_cfg)
    if not whisper_trainable:
        feats = jax.lax.stop_gradient(feats)
    kw: dict[str, Any] = {}
    if "segment_ids" in batch and supports_segments():
        kw["segment_ids"] = batch["segment_ids"]
    if loss_cfg.sparse and not collect:
        # the audio branch only feeds the audio loss: skip it when this micro-batch has none
        # (collect keeps it: the parity tests compare its activations)
        kw["audio_branch"] = jnp.any(batch["audio_loss_mask"] > 0)
    out = KimiaLLM(llm_cfg).apply(
        {"params": params["llm"]},
        batch["audio_ids"],
        batch["text_ids"],
        batch["positions"],
        feats,
        batch["is_continuous"],
        collect=True,  # the final normed hidden states (aux norm_out / mimo_norm_out)
        causal_by_index=causal_by_index,
        **kw,
    )
    llm_p = params["llm"]
    heads = (
        (out.aux["norm_out"], llm_p["lm_head"]["weight"], batch["text_labels"]),
        (out.aux["mimo_norm_out"], llm_p["mimo_output"]["weight"], batch["audio_labels"]),
    )
    if loss_cfg.sparse:
        masks = (batch["text_loss_mask"], batch["audio_loss_mask"])
        (text_ce, _), (audio_ce, _) = (
            masked_head_cross_entropy(
                *hd, mk, chunk=loss_cfg.sparse_chunk, max_chunk=loss_cfg.ce_chunk
            )
            for hd, mk in zip(heads, masks, strict=True)
        )
    else:
        (text_ce, _), (audio_ce, _) = (
            head_cross_entropy(*hd, chunk=loss_cfg.ce_chunk) for hd in heads
        )
    loss, metrics = kimia_loss(text_ce, audio_ce, batch, loss_cfg, denoms)
    if collect:  # every position's CE (parity tests); not differentiated
        (text_ce, text_lse), (audio_ce, audio_lse) = (
            head_cross_entropy(*jax.lax.stop_gradient(hd), chunk=loss_cfg.ce_chunk) for hd in heads
        )
        metrics.update(
            text_ce=text_ce,
            audio_ce=audio_ce,
            text_logsumexp=text_lse,
            audio_logsumexp=audio_lse,
            whisper_feature=feats,
            inputs_embeds=out.aux["inputs_embeds"],
            norm_out=out.aux["norm_out"],
            mimo_norm_out=out.aux["mimo_norm_out"],
        )
    return loss, metrics


def loss_and_grads(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    llm_cfg: LlmConfig,
    whisper_cfg: WhisperConfig,
    loss_cfg: LossConfig,
    whisper_trainable: bool,
    collect: bool = False,
    causal_by_index: bool = True,
) -> tuple[jax.Array, dict[str, Any], Any]:
    """Loss, metrics and gradients of a batch [B, ...] or accumulated over [A, B, ...]."""
    denoms = denominators(batch, loss_cfg)
    fn = functools.partial(
        forward_loss,
        llm_cfg=llm_cfg,
        whisper_cfg=whisper_cfg,
        loss_cfg=loss_cfg,
        whisper_trainable=whisper_trainable,
        collect=collect,
        causal_by_index=causal_by_index,
    )

    def one(mb: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any], Any]:
        if whisper_trainable:
            (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params, mb, denoms)
        else:  # no backward through the encoder at all
            (loss, metrics), g = jax.value_and_grad(
                lambda p: fn({"llm": p, "whisper": params["whisper"]}, mb, denoms), has_aux=True
            )(params["llm"])
            grads = {"llm": g, "whisper": jax.tree.map(jnp.zeros_like, params["whisper"])}
        return loss, metrics, grads

    if batch["audio_ids"].ndim == 2:
        return one(batch)

    def body(carry: Any, mb: dict[str, jax.Array]) -> tuple[Any, dict[str, Any]]:
        loss, metrics, grads = one(mb)
        acc_loss, acc_grads = carry
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads)), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), per_mb = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
    metrics = {k: v for k, v in per_mb.items()}
    for k in ("loss", "loss_text", "loss_audio", "n_text", "n_audio"):
        metrics[k] = jnp.sum(per_mb[k])
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, grads


# ----------------------------------------------------------------------------------------------
# the step


def batch_shardings(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedShardings of a batch dict by `BATCH_AXES` (extra leading axes replicated)."""
    out = {}
    for k, v in batch.items():
        axes = BATCH_AXES.get(k)
        if axes is None:
            out[k] = NamedSharding(mesh, PartitionSpec())
            continue
        lead = (None,) * (np.ndim(v) - len(axes))
        out[k] = sharding.named_sharding(lead + axes, np.shape(v), mesh)
    return out


def _dict_keys(path: Any) -> tuple[Any, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def like_params(tree: Any, params: Any, param_shardings: Any, default: Any) -> Any:
    """Shardings for an optimizer-state-like tree (the one code path for every optimizer state:
    `TrainStep`, `LoraTrainStep`, `tools/plan_memory`).

    A leaf whose dict-key path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding; every other leaf (step counts, scalars) gets `default`. Works on any optax
    state, `multi_transform` / `masked` included: a group's `MaskedNode` placeholders are empty
    pytree nodes and stay as they are (they hold no array, so need no sharding), and the path of a
    leaf inside a group (`inner_states["llm"].inner_state[0].mu["llm"]["norm"]["weight"]`) still
    ends with its parameter's path. Paths come from `param_shardings` itself and shapes from
    `params` (arrays or ShapeDtypeStructs of the same tree).
    """
    shapes = {
        _dict_keys(path): np.shape(p) for path, p in jax.tree_util.tree_leaves_with_path(params)
    }
    by_path = {}
    for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings, is_leaf=_is_sharding):
        keys = _dict_keys(path)
        if keys not in shapes:
            raise ValueError(
                f"parameter shardings name {'/'.join(map(str, keys))}, which the params lack: "
                "the params and the model config disagree (layer layout scan_layers, LoRA "
                "adapters?); convert the params with kimia_llm.to_layout first"
            )
        by_path[keys] = (shapes[keys], sh)

    def pick(path: Any, leaf: Any) -> Any:
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


class TrainStep:
    """Builds, shards and compiles the train step (one compile per phase and batch shape).

    Args:
      llm_cfg, whisper_cfg: the model configs (their dtype fields are overridden by
        `cfg.compute_dtype`; parameters keep their dtype).
      cfg: TrainConfig.
      mesh: device mesh (None: one device, no shardings).
      labels, extra_groups: optimizer groups (see `optim.make_optimizer`).
    """

    def __init__(
        self,
        llm_cfg: LlmConfig,
        whisper_cfg: WhisperConfig,
        cfg: TrainConfig | None = None,
        mesh: Mesh | None = None,
        *,
        labels: Any = optim.param_labels,
        extra_groups: dict[str, optax.GradientTransformation] | None = None,
    ) -> None:
        self.cfg = cfg or TrainConfig()
        if self.cfg.packed and not supports_segments():
            raise NotImplementedError(
                "packed rows need KimiaLLM's segment-id attention mask, which this build lacks; "
                "train with one example per row (TrainConfig(packed=False))"
            )
        dt = self.cfg.compute_dtype
        self.llm_cfg = llm_cfg.replace(**self.cfg.llm_overrides())
        wkw: dict[str, Any] = {"dtype": dt, "remat_policy": self.cfg.whisper_remat_policy}
        fields = {f.name for f in dataclasses.fields(whisper_cfg)}
        if mesh is not None and "attention_chunk" in fields:
            # the CPU query-chunk loop indexes heads/rows dynamically, which the partitioner can
            # only run replicated (every device encodes every window): batched attention instead
            wkw["attention_chunk"] = None
        self.whisper_cfg = dataclasses.replace(whisper_cfg, **wkw)
        self.mesh = mesh
        self._labels = labels
        self._extra = extra_groups
        self._steps: dict[bool, Any] = {}
        self._grads: dict[tuple[bool, bool], Any] = {}

    # -- optimizer / state -----------------------------------------------------------------------

    def optimizer(self, whisper_trainable: bool) -> optax.GradientTransformation:
        return optim.make_optimizer(
            self.cfg.optim,
            whisper_trainable=whisper_trainable,
            labels=self._labels,
            extra_groups=self._extra,
        )

    def param_shardings(self) -> Any:
        if self.mesh is None:
            return None
        return {
            "llm": sharding.shardings_for(kimia_llm.abstract_params(self.llm_cfg), self.mesh),
            "whisper": sharding.shardings_for(wenc.abstract_params(self.whisper_cfg), self.mesh),
        }

    def state_shardings(self, state: TrainState) -> Any:
        """Shardings of a TrainState (or its `abstract_state`): params by logical names, optimizer
        leaves like their params (`like_params`, any optax state incl. multi_transform groups),
        scalars (counts) replicated."""
        if self.mesh is None:
            return None
        ps = self.param_shardings()
        rep = sharding.replicated(self.mesh)
        opt = like_params(state.opt_state, state.params, ps, rep)
        return TrainState(
            step=rep, params=ps, opt_state=opt, whisper_trainable=state.whisper_trainable
        )

    def to_layout(self, params: Any) -> Any:
        """{"llm", "whisper"} params with the LLM in this step's layer layout (`scan_layers`);
        the same object when it already is."""
        llm = kimia_llm.to_layout(params["llm"], self.llm_cfg, self.mesh)
        return params if llm is params["llm"] else {**params, "llm": llm}

    def init_fn(self, whisper_trainable: bool) -> Any:
        """params -> fresh TrainState (step 0, zero moments); un-jitted, for `jax.eval_shape`."""
        tx = self.optimizer(whisper_trainable)

        def make(p: Any) -> TrainState:
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=p,
                opt_state=tx.init(p),
                whisper_trainable=whisper_trainable,
            )

        return make

    def abstract_state(self, params: Any, *, whisper_trainable: bool = True) -> TrainState:
        """The TrainState of `params` as ShapeDtypeStructs (params may be abstract themselves)."""
        return jax.eval_shape(self.init_fn(whisper_trainable), params)

    def init(self, params: Any, *, whisper_trainable: bool = True) -> TrainState:
        """Fresh state (step 0, zero moments) around `params` {"llm": ..., "whisper": ...} (either
        LLM layer layout: converted to this step's)."""
        params = self.to_layout(params)
        make = self.init_fn(whisper_trainable)
        if self.mesh is None:
            return jax.jit(make)(params)
        out = self.state_shardings(self.abstract_state(params, whisper_trainable=whisper_trainable))
        ps = self.param_shardings()
        return jax.jit(make, in_shardings=(ps,), out_shardings=out)(params)

    @staticmethod
    def checkpointed_params(params: Any) -> Any:
        """The part of the state's params a checkpoint holds (all of it: everything trains)."""
        return params

    def restore_params(self, saved: Any, initial: Any) -> Any:
        """State params from a checkpoint's `saved` params and the run's initial params."""
        del initial
        return saved

    def unfreeze_whisper(self, state: TrainState) -> TrainState:
        """The trainable phase: the encoder group gets AdamW with fresh moments and step count;
        the other groups keep their state."""
        if state.whisper_trainable:
            return state
        fresh = self.init(state.params, whisper_trainable=True)
        groups = optim.group_states(fresh.opt_state)
        old = optim.group_states(state.opt_state)
        groups.update({k: v for k, v in old.items() if k != "whisper"})
        opt_state = optim.replace_group_states(fresh.opt_state, groups)
        return TrainState(
            step=state.step, params=state.params, opt_state=opt_state, whisper_trainable=True
        )

    # -- compiled functions ----------------------------------------------------------------------

    def _with_mesh(self, fn: Any) -> Any:
        """Calls `fn` under the mesh context (`sharding.constrain` reads it; part of jit's key)."""
        mesh = self.mesh

        @functools.wraps(fn)
        def wrapped(*a: Any) -> Any:
            with sharding.mesh_context(mesh):
                return fn(*a)

        return wrapped

    def _step_fn(self, whisper_trainable: bool) -> Any:
        tx = self.optimizer(whisper_trainable)
        sched = optim.schedule(self.cfg.optim)

        def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
            loss, metrics, grads = loss_and_grads(
                state.params,
                batch,
                llm_cfg=self.llm_cfg,
                whisper_cfg=self.whisper_cfg,
                loss_cfg=self.cfg.loss,
                whisper_trainable=whisper_trainable,
            )
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=sched(state.step))
            new = TrainState(
                step=state.step + 1,
                params=params,
                opt_state=opt_state,
                whisper_trainable=whisper_trainable,
            )
            return new, metrics

        return step

    def __call__(
        self, state: TrainState, batch: dict[str, Any]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (donates `state`)."""
        phase = state.whisper_trainable
        if phase not in self._steps:
            fn = self._step_fn(phase)
            if self.mesh is None:
                jitted = jax.jit(fn, donate_argnums=0)
            else:
                st = self.state_shardings(state)
                jitted = jax.jit(fn, out_shardings=(st, None), donate_argnums=0)
            self._steps[phase] = self._with_mesh(jitted)
        check_positions(batch)
        if self.mesh is not None:
            batch = jax.device_put(batch, batch_shardings(batch, self.mesh))
        return self._steps[phase](state, batch)

    def loss_and_grads(
        self,
        params: Any,
        batch: dict[str, Any],
        *,
        whisper_trainable: bool = True,
        collect: bool = False,
    ) -> tuple[jax.Array, dict[str, Any], Any]:
        """Jitted loss, metrics (+ activations with collect) and raw gradients, no update.
        `params` in either LLM layer layout; gradients come in this step's layout."""
        params = self.to_layout(params)
        key = (whisper_trainable, collect)
        if key not in self._grads:
            fn = functools.partial(
                loss_and_grads,
                llm_cfg=self.llm_cfg,
                whisper_cfg=self.whisper_cfg,
                loss_cfg=self.cfg.loss,
                whisper_trainable=whisper_trainable,
                collect=collect,
            )
            self._grads[key] = self._with_mesh(jax.jit(fn))
        check_positions(batch)
        if self.mesh is not None:
            batch = jax.device_put(batch, batch_shardings(batch, self.mesh))
        return self._grads[key](params, batch)
