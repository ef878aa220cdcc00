"""LoRA (and QLoRA) fine-tuning of KimiaLLM: low-rank adapters on chosen projections, frozen base.

Adapters live in the parameter tree next to the weight they adapt (`.../q_proj/lora_a` [r, in],
`.../q_proj/lora_b` [out, r], the [out, in] layout of layers/linear.py), so they follow every
layout the model has: unrolled `layers_<i>/...` or scanned `layers/...` with a leading layer axis
(nn.scan slices them with the weights), remat and sharding included. A flax method interceptor on
`Linear` adds the low-rank path `scale * B (A x)` to the base output inside the layer (so remat
recomputes it and no merged [out, in] matrix is ever built in training); an int8/int4 base weight
(QLoRA) is a `layers.quant.QWeight`, which `Linear` multiplies as it is.

    lcfg = LoraConfig(rank=16, select=r"^layers_(2[0-7])/")   # main layers 20-27
    llm = lora.add_adapters(lora.quantize(params["llm"], "int8"), lcfg, key)  # int8: optional
    step = lora.LoraTrainStep(llm_cfg, whisper_cfg, lcfg, TrainConfig(...), mesh)
    state = step.init({"llm": llm, "whisper": params["whisper"]})
    state, metrics = step(state, batch)                 # AdamW sees only the adapters
    lora.export(lora.combine(state.params["lora"], state.params["frozen"]["llm"]), lcfg,
                out_dir, config_json)                   # W + (alpha / r) B A, loadable by llm.load
    # lower level: lora.LoraModel(KimiaLLM(cfg), lcfg).apply, lora.split / combine / merge

Why not qwix (0.1.8, tried first): its LoraProvider intercepts `jnp.einsum`/`dot_general` inside
modules and takes the *right-hand* operand as the weight. Our `matmul_t` computes `W @ x^T` (weight
on the left, an optimization barrier, a transpose) for <= 256 rows on CPU, the orientation that
decodes ~2x faster there (layers/linear.py). Measured on the tiny KimiaLLM with
`LoraProvider(module_path=".*q_proj", rank=4)`: with 4 positions `init` created no adapter at all
(the params were just weight/bias); with 300 positions it raised `SetAttributeFrozenModuleError`
(it sets `weight_lora_einsum_str` on a frozen linen module). Its QLoRA path also quantizes through
its own interception of `self.param`, which our `w.astype(dtype)` before the matmul bypasses.
What remains to write is small (this file) and works on the param tree the converters,
checkpoints and sharding rules already use.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimia_jax import sharding
from kimia_jax.conversion.common import flatten, unflatten
from kimia_jax.layers import quant
from kimia_jax.layers.linear import Linear, matmul_t

ATTN, MLP = quant.ATTN, quant.MLP
LORA_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which projections get adapters, and how big.

    Attributes:
      rank: r of A [r, in] and B [out, r].
      alpha: the update is (alpha / rank) * B @ A.
      targets: projection names (attention: q/k/v/o_proj; MLP: gate/up/down_proj).
      select: regex searched in the weight's param path, e.g. r"^layers_(2[0-7])/" (main layers
        20-27), r"^mimo_layers_" (the audio branch only), r"^(mimo_)?layers" (everything). In the
        scanned layout one path covers a whole stack (all its layers get adapters).
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ATTN + MLP
    select: str = r"^(mimo_)?layers"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        unknown = set(self.targets) - set(ATTN + MLP)
        if unknown:
            raise ValueError(f"targets {sorted(unknown)} are not projections; use {ATTN + MLP}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ----------------------------------------------------------------------------------------------
# Quantized frozen weights


# The quantizer is layers/quant.py (shared with `KimiAudio(quantize=...)` inference).
QWeight = quant.QWeight
quantize_weight = quant.quantize_weight


def _is_layer_matrix(path: str, leaf: Any) -> bool:
    parts = path.split("/")
    return (
        len(parts) >= 3
        and parts[-1] == "weight"
        and parts[-2] in ATTN + MLP
        and getattr(leaf, "ndim", 0) >= 2
    )


def quantize(params: Any, kind: str | None, group: int | None = None) -> Any:
    """Every projection matrix of every layer quantized ("int8"/"int4"); embeddings, heads, norms,
    biases and the adaptor are kept as they are. kind None or "none": params unchanged."""
    return quant.quantize(params, kind, group, modules=ATTN + MLP)


# ----------------------------------------------------------------------------------------------
# Adapters in the param tree


def target_paths(params: Any, cfg: LoraConfig) -> list[str]:
    """Param paths (".../q_proj/weight") of the weights that get adapters."""
    rx = re.compile(cfg.select)
    return sorted(
        k
        for k, v in flatten(params).items()
        if _is_layer_matrix(k, v) and k.split("/")[-2] in cfg.targets and rx.search(k)
    )


def add_adapters(params: Any, cfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> Any:
    """params plus `lora_a` (kaiming-uniform, as PEFT) and `lora_b` (zeros) next to each target, so
    the adapted model starts equal to the base. Raises if `select`/`targets` match nothing."""
    paths = target_paths(params, cfg)
    if not paths:
        raise ValueError(
            f"LoRA select={cfg.select!r} targets={cfg.targets} matches no projection weight"
        )
    flat = flatten(params)
    for i, p in enumerate(paths):
        *lead, out, n_in = flat[p].shape
        bound = 1.0 / math.sqrt(n_in)
        k = jax.random.fold_in(key, i)
        base = p.rsplit("/", 1)[0]
        flat[f"{base}/lora_a"] = jax.random.uniform(
            k, (*lead, cfg.rank, n_in), dtype, -bound, bound
        )
        flat[f"{base}/lora_b"] = jnp.zeros((*lead, out, cfg.rank), dtype)
    return unflatten(flat)


def is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in LORA_KEYS


def split(params: Any) -> tuple[Any, Any]:
    """(adapters, frozen base) as two trees; `combine` is the inverse."""
    flat = flatten(params)
    return (
        unflatten({k: v for k, v in flat.items() if is_adapter(k)}),
        unflatten({k: v for k, v in flat.items() if not is_adapter(k)}),
    )


def combine(adapters: Any, frozen: Any) -> Any:
    return unflatten({**flatten(frozen), **flatten(adapters)})


def trainable_mask(params: Any) -> Any:
    """Bool tree: True on adapters (for optax.masked / multi_transform)."""
    return unflatten({k: is_adapter(k) for k in flatten(params)})


def merge(params: Any, cfg: LoraConfig, dtype: Any = None) -> Any:
    """Full weights: W + scale * B @ A for every adapted projection (the product in fp32, then
    cast to `dtype`, default the base weight's dtype; a quantized base is dequantized first).
    The result has no adapters and no QWeight: the released layout, loadable and exportable."""
    flat = flatten(params)
    out = {}
    for k, v in flat.items():
        if is_adapter(k):
            continue
        w = v
        if isinstance(v, QWeight):
            w = v.dequantize(jnp.float32)
        base = k.rsplit("/", 1)[0]
        if k.endswith("/weight") and f"{base}/lora_a" in flat:
            a = flat[f"{base}/lora_a"].astype(jnp.float32)
            b = flat[f"{base}/lora_b"].astype(jnp.float32)
            delta = jnp.einsum("...or,...ri->...oi", b, a, precision="highest")
            w = w.astype(jnp.float32) + cfg.scale * delta
        target = dtype or (jnp.float32 if isinstance(v, QWeight) else v.dtype)
        out[k] = w.astype(target) if hasattr(w, "astype") else w
    return unflatten(out)


def export(
    params: Any,
    cfg: LoraConfig,
    out_dir: Any,
    config_json: str,
    *,
    dtype: Any = jnp.bfloat16,
    overwrite: bool = False,
) -> Any:
    """Merges the adapters into full weights and writes them as a converted checkpoint (Orbax +
    config.json, what `conversion.llm.load` / `tools.convert_llm` produce), atomically.

    Args:
      params: adapted LLM params (unrolled layout; unstack a scanned tree first).
      cfg: the LoRA config the adapters were trained with.
      out_dir: directory to create; config_json: the base model's config.json text.
      dtype: stored dtype of the merged weights (the released weights are bf16).
    """
    from kimia_jax import checkpoint

    merged = merge(params, cfg, dtype)
    return checkpoint.save(
        out_dir,
        merged,
        files={"config.json": config_json},
        meta={
            "model": "kimia_llm",
            "lora": dataclasses.asdict(cfg),
            "dtype": jnp.dtype(dtype).name,
        },
        overwrite=overwrite,
    )


# ----------------------------------------------------------------------------------------------
# The adapted forward


def _lora_linear(module: Linear, x: jax.Array, scale: float) -> jax.Array:
    """Linear.__call__ with a dequantized base and the low-rank path, from the bound variables."""
    params = module.variables["params"]
    w = params["weight"]  # a QWeight is multiplied as it is (layers.linear.matmul_t)
    w = w if isinstance(w, QWeight) else w.astype(module.dtype)
    x = x.astype(module.dtype)
    y = matmul_t(x, w)
    if "lora_a" in params:
        a = params["lora_a"].astype(module.dtype)
        b = params["lora_b"].astype(module.dtype)
        y = y + scale * matmul_t(matmul_t(x, a), b)
    if module.use_bias:
        y = y + params["bias"].astype(module.dtype)
    return y


def interceptor(cfg: LoraConfig):
    """flax method interceptor: Linear calls whose params hold adapters are routed through
    `_lora_linear`; everything else (a QWeight base included: `Linear` takes it) runs unchanged."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (
            isinstance(module, Linear)
            and context.method_name == "__call__"
            and module.has_variable("params", "weight")
        ) and "lora_a" in module.variables["params"]:
            return _lora_linear(module, *args, cfg.scale, **kwargs)
        return next_fun(*args, **kwargs)

    return intercept


class LoraModel:
    """Wraps a linen model so `.apply` runs with the LoRA interceptor (same signature)."""

    def __init__(self, model: nn.Module, cfg: LoraConfig):
        self.model = model
        self.cfg = cfg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(interceptor(self.cfg)):
            return self.model.apply(variables, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# The LoRA train step


def logical_axes(llm_cfg: Any, params: Any) -> Any:
    """Logical axis names of every leaf of an adapted (and maybe quantized) LLM param tree:
    weights as the model declares them, lora_a (lead, None, in), lora_b (lead, out, None),
    QWeight q like the weight and its scales (lead, out, None)."""
    from kimia_jax.models import kimia_llm

    declared = flatten(
        jax.tree.map(
            lambda x: x.names if isinstance(x, nn.Partitioned) else None,
            kimia_llm.abstract_params(llm_cfg),
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
    )
    out = {}
    for k, v in flatten(params).items():
        base = k.rsplit("/", 1)[0]
        w = declared.get(f"{base}/weight")
        if k.endswith("/lora_a"):
            out[k] = (*w[:-2], None, w[-1])
        elif k.endswith("/lora_b"):
            out[k] = (*w[:-2], w[-2], None)
        elif isinstance(v, QWeight):
            w = declared[k]
            out[k] = QWeight(q=w, scale=(*w[:-1], None))
        else:
            out[k] = declared[k]
    return unflatten(out)


def shardings(llm_cfg: Any, params: Any, mesh: Any) -> Any:
    """NamedShardings of an adapted LLM param tree (see `logical_axes`)."""
    from kimia_jax import sharding

    axes = flatten(logical_axes(llm_cfg, params))
    flat = flatten(params)
    out = {}
    for k, v in flat.items():
        if isinstance(v, QWeight):
            out[k] = QWeight(
                q=sharding.named_sharding(axes[k].q, v.q.shape, mesh),
                scale=sharding.named_sharding(axes[k].scale, v.scale.shape, mesh),
            )
        else:
            out[k] = sharding.named_sharding(axes[k], v.shape, mesh)
    return unflatten(out)


def _frozen_whisper(whisper_trainable: bool) -> None:
    if whisper_trainable:
        raise ValueError(
            "LoRA training keeps the Whisper encoder frozen: do not unfreeze it "
            "(experiments configs: loop.unfreeze_whisper_fraction >= 1)"
        )


class LoraTrainStep:
    """The real train step (`train_step.forward_loss`: Whisper on the windows, dual-head LLM,
    chunked two-stream loss) with only the adapters trained.

    State params: {"lora": adapters} (what AdamW, clipping and the grad norm see) and
    {"frozen": {"llm": base without adapters (maybe int8/int4), "whisper": encoder}} carried
    through unchanged (no gradient is computed for it, no optimizer state). The Whisper encoder is
    frozen (its output is stop_gradient'ed). A leading micro-batch axis accumulates gradients.
    """

    def __init__(
        self,
        llm_cfg: Any,
        whisper_cfg: Any,
        lora_cfg: LoraConfig,
        cfg: Any = None,
        mesh: Any = None,
    ) -> None:
        from kimia_jax.training import train_step as ts

        self._ts = ts.TrainStep(llm_cfg, whisper_cfg, cfg, mesh)  # configs, dtypes, checks
        self.lora_cfg = lora_cfg
        self.cfg, self.mesh = self._ts.cfg, mesh
        self.llm_cfg, self.whisper_cfg = self._ts.llm_cfg, self._ts.whisper_cfg
        self._step = None

    def optimizer(self) -> Any:
        import optax

        from kimia_jax.training import optim

        tx = optim.adamw(self.cfg.optim)
        if self.cfg.optim.clip_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(self.cfg.optim.clip_norm), tx)
        return tx

    def state_shardings(self, params: Any) -> Any:
        """Shardings of the state built around `params` (as `init` takes them)."""
        from kimia_jax import sharding
        from kimia_jax.models import whisper_encoder as wenc
        from kimia_jax.training.train_step import TrainState, like_params

        if self.mesh is None:
            return None
        adapters, base = split(params["llm"])
        ad_sh = unflatten(
            {k: v for k, v in flatten(shardings(self.llm_cfg, params["llm"], self.mesh)).items()
             if is_adapter(k)}
        )  # fmt: skip
        base_sh = shardings(self.llm_cfg, base, self.mesh)
        wsh = sharding.shardings_for(wenc.abstract_params(self.whisper_cfg), self.mesh)
        rep = sharding.replicated(self.mesh)
        tx = self.optimizer()
        opt_abs = jax.eval_shape(tx.init, adapters)
        opt = like_params(opt_abs, adapters, ad_sh, rep)
        return TrainState(
            step=rep,
            params={"lora": ad_sh, "frozen": {"llm": base_sh, "whisper": wsh}},
            opt_state=opt,
            whisper_trainable=False,
        )

    def init_fn(self) -> Any:
        """params {"llm": adapted (`add_adapters`), "whisper": encoder} -> fresh state (step 0,
        zero moments); un-jitted, for `jax.eval_shape` / AOT planning."""
        from kimia_jax.training.train_step import TrainState

        tx = self.optimizer()

        def make(params: Any) -> Any:
            adapters, base = split(params["llm"])
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params={"lora": adapters, "frozen": {"llm": base, "whisper": params["whisper"]}},
                opt_state=tx.init(adapters),
                whisper_trainable=False,
            )

        return make

    def init(self, params: Any, *, whisper_trainable: bool = False) -> Any:
        """State around {"llm": adapted params (`add_adapters`), "whisper": encoder params}."""
        _frozen_whisper(whisper_trainable)
        if self.mesh is None:
            return jax.jit(self.init_fn())(params)
        return jax.jit(self.init_fn(), out_shardings=self.state_shardings(params))(params)

    def unfreeze_whisper(self, state: Any) -> Any:
        """The encoder stays frozen under LoRA (the Trainer calls this only when its loop
        config unfreezes Whisper, which a LoRA run must not ask for)."""
        _frozen_whisper(True)
        return state

    @staticmethod
    def checkpointed_params(params: Any) -> Any:
        """What a checkpoint holds: the adapters only (the frozen base and encoder are the
        run's initial params, rebuilt by `restore_params`; an int4 base is never written)."""
        return {"lora": params["lora"]}

    def restore_params(self, saved: Any, initial: Any) -> Any:
        """State params from checkpointed adapters + the initial {"llm" (adapted), "whisper"}
        params (their frozen part, placed on the state's shardings)."""
        frozen = {"llm": split(initial["llm"])[1], "whisper": initial["whisper"]}
        if self.mesh is not None:
            frozen = jax.device_put(frozen, self.state_shardings(initial).params["frozen"])
        return {"lora": saved["lora"], "frozen": frozen}

    def loss_and_grads(self, adapters: Any, frozen: Any, batch: dict[str, Any]) -> Any:
        """Loss, metrics and adapter gradients (traced inside the step; callable eagerly too)."""
        import functools

        from kimia_jax.training import train_step as ts
        from kimia_jax.training.loss import denominators

        denoms = denominators(batch, self.cfg.loss)
        fn = functools.partial(
            ts.forward_loss,
            llm_cfg=self.llm_cfg,
            whisper_cfg=self.whisper_cfg,
            loss_cfg=self.cfg.loss,
            whisper_trainable=False,
        )

        def loss_fn(ad: Any, mb: dict[str, jax.Array]) -> Any:
            p = {"llm": combine(ad, frozen["llm"]), "whisper": frozen["whisper"]}
            with nn.intercept_methods(interceptor(self.lora_cfg)):
                return fn(p, mb, denoms)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if batch["audio_ids"].ndim == 2:
            (loss, metrics), grads = grad_fn(adapters, batch)
            return loss, metrics, grads

        def body(carry: Any, mb: dict[str, jax.Array]) -> Any:
            (loss, metrics), g = grad_fn(adapters, mb)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], g)), metrics

        zeros = jax.tree.map(jnp.zeros_like, adapters)
        (loss, grads), per_mb = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
        metrics = dict(per_mb)
        for k in ("loss", "loss_text", "loss_audio", "n_text", "n_audio"):
            metrics[k] = jnp.sum(per_mb[k])
        return loss, metrics, grads

    def step_fn(self) -> Any:
        """The un-jitted step (state, batch) -> (state, metrics), for AOT lowering."""
        import optax

        from kimia_jax.training import optim
        from kimia_jax.training.train_step import TrainState

        tx = self.optimizer()
        sched = optim.schedule(self.cfg.optim)

        def step(state: Any, batch: dict[str, jax.Array]) -> Any:
            ad, frozen = state.params["lora"], state.params["frozen"]
            loss, metrics, grads = self.loss_and_grads(ad, frozen, batch)
            updates, opt_state = tx.update(grads, state.opt_state, ad)
            ad = optax.apply_updates(ad, updates)
            metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=sched(state.step))
            return TrainState(
                step=state.step + 1,
                params={"lora": ad, "frozen": frozen},
                opt_state=opt_state,
                whisper_trainable=False,
            ), metrics

        return step

    def __call__(self, state: Any, batch: dict[str, Any]) -> Any:
        """One optimizer step on the adapters (donates `state`)."""
        from kimia_jax.training.train_step import batch_shardings, check_positions

        if self._step is None:
            kw = {}
            if self.mesh is not None:
                full = {"llm": combine(state.params["lora"], state.params["frozen"]["llm"]),
                        "whisper": state.params["frozen"]["whisper"]}  # fmt: skip
                kw["out_shardings"] = (self.state_shardings(full), None)
            self._step = jax.jit(self.step_fn(), donate_argnums=0, **kw)
        check_positions(batch)
        if self.mesh is not None:
            batch = jax.device_put(batch, batch_shardings(batch, self.mesh))
        # The mesh context (which `sharding.constrain` reads) is part of what jit traces for.
        with sharding.mesh_context(self.mesh):
            return self._step(state, batch)

    def merged(self, state: Any, dtype: Any = None) -> Any:
        """Full LLM weights of a state (base + scale * B @ A): the released layout."""
        return merge(combine(state.params["lora"], state.params["frozen"]["llm"]), self.lora_cfg,
                     dtype)  # fmt: skip
