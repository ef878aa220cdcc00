"""Optimizer of the train step (training.md §5.5): AdamW with linear warmup + cosine decay, weight
decay masked off norms and biases, global-norm clipping, and the Whisper encoder in its own
`optax.multi_transform` group (frozen: `set_to_zero`, so no update and no decay; trainable: its
own AdamW with fresh moments and its own step count).

Parameters are the tree `{"llm": ..., "whisper": ...}`; `param_labels` maps each top-level subtree
to its group. Anything else that wants its own group (LoRA adapters, ...) passes its own labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from kimia_jax.models import kimia_llm


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW + schedule. Defaults: the official SFT (`finetune_ds.sh`: lr 1e-5, beta2 0.95, weight
    decay 0.1, clip 1.0) with the report's cosine to 10 % of the peak (training.md §5.2).

    Attributes:
      learning_rate: peak learning rate; end_lr_ratio: final lr / peak (cosine end).
      warmup_steps: linear warmup from 0; total_steps: warmup + decay steps.
      b1, b2, eps, weight_decay: AdamW (decay off 1-D params: norm scales and biases).
      clip_norm: global gradient-norm clip over all groups (None: off).
      whisper_learning_rate: peak lr of the encoder group (None: learning_rate). Its schedule runs
        on the group's own step count, so an encoder unfrozen mid-run warms up again.
    """

    learning_rate: float = 1e-5
    end_lr_ratio: float = 0.1
    warmup_steps: int = 0
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    whisper_learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ValueError(
                f"OptimConfig: need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                f"({self.total_steps}) and total_steps >= 1"
            )


def schedule(cfg: OptimConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine to end_lr_ratio * peak."""
    peak = cfg.learning_rate if peak is None else peak
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.end_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every parameter with 2+ dims. In these models the 1-D
    parameters are exactly the norm scales (RMSNorm, LayerNorm incl. the adaptor's) and biases.
    Leaves of a stacked layer tree (`scan_layers`: `layers/...`, `mimo_layers/...`) carry a
    leading layer axis, which does not count."""

    def one(path: Any, p: Any) -> bool:
        stacked = any(
            isinstance(k, jax.tree_util.DictKey) and k.key in kimia_llm.STACK_NAMES for k in path
        )
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


def param_labels(params: Any) -> Any:
    """Group of each leaf: its top-level key ("llm" or "whisper")."""
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def adamw(cfg: OptimConfig, peak: float | None = None) -> optax.GradientTransformation:
    return optax.adamw(
        schedule(cfg, peak),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )


def make_optimizer(
    cfg: OptimConfig,
    *,
    whisper_trainable: bool,
    labels: Callable[[Any], Any] = param_labels,
    extra_groups: dict[str, optax.GradientTransformation] | None = None,
) -> optax.GradientTransformation:
    """clip_by_global_norm -> multi_transform({"llm": AdamW, "whisper": AdamW | set_to_zero})."""
    groups: dict[str, optax.GradientTransformation] = {
        "llm": adamw(cfg),
        "whisper": adamw(cfg, cfg.whisper_learning_rate)
        if whisper_trainable
        else optax.set_to_zero(),
        "frozen": optax.set_to_zero(),
    }
    groups.update(extra_groups or {})
    tx = optax.multi_transform(groups, labels)
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def group_states(opt_state: Any) -> dict[str, Any]:
    """The per-group inner states of a `make_optimizer` state (mutable copy)."""
    mt = opt_state if isinstance(opt_state, optax.MultiTransformState) else opt_state[-1]
    return dict(mt.inner_states)


def replace_group_states(opt_state: Any, states: dict[str, Any]) -> Any:
    """`opt_state` with the given per-group inner states."""
    if isinstance(opt_state, optax.MultiTransformState):
        return opt_state._replace(inner_states=states)
    return (*opt_state[:-1], replace_group_states(opt_state[-1], states))
