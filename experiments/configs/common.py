"""Defaults shared by every training config (each config file overrides what it needs)."""

from __future__ import annotations

import ml_collections


def task(name: str, kind: str, path: str = "", *, weight: float = 1.0, seed: int = 0, **kw):
    """One data task: kind asr_clips | sft_jsonl | sft_array_record | pretrain (+ layout)."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            kind=kind,
            path=path,
            weight=weight,
            seed=seed,
            layout=kw.pop("layout", ""),
            instruction=kw.pop(
                "instruction", "Please transcribe the spoken content into written text."
            ),
            **kw,
        )
    )


def tasks(*ts: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tasks by name, in order (`--config.data.tasks.<name>.path=...` overrides one)."""
    out = ml_collections.ConfigDict()
    for t in ts:
        out[t.name] = t
    out.order = ",".join(t.name for t in ts)
    return out


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # scan_layers: the LLM's layer stacks as nn.scan (compiles once per stack; the checkpoint's
    # unrolled params are stacked on init, exports unstack them); remat_policy: per-layer remat of
    # the LLM (kimia_llm.REMAT_POLICIES: none, full, dots_saveable, save_qkv_proj, ...);
    # whisper_remat_policy: per-layer remat of the encoder while it trains.
    c.model = ml_collections.ConfigDict(
        dict(
            path="tiny",
            seed=0,
            scan_layers=False,
            remat_policy="none",
            whisper_remat_policy="full",
        )
    )
    c.distributed = False  # jax.distributed.initialize() without arguments (TPU / SLURM)
    c.mesh = "data=-1,fsdp=1"  # sharding.parse_mesh: data, fsdp, tensor
    c.compute_dtype = "float32"
    c.global_batch_rows = 8
    c.data = ml_collections.ConfigDict(
        dict(
            tasks=ml_collections.ConfigDict(),
            length=8192,
            max_windows=4,
            overflow="truncate",
            buffer_size=64,
            prefetch_workers=0,
            read_threads=1,
            wav_dtype="int16",
            asr_repeat=1,  # asr_clips tasks: records per clip
        )
    )
    # training.md §5.5 defaults (official SFT: lr 1e-5, beta2 0.95, decay 0.1, clip 1.0)
    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-5,
            end_lr_ratio=0.1,
            warmup_steps=0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
            whisper_learning_rate=ml_collections.FieldReference(None, field_type=float),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            reduction="stream_mean", text_weight=1.0, audio_weight=1.0, ce_chunk=512, max_segments=8
        )
    )
    c.loop = ml_collections.ConfigDict(
        dict(
            total_steps=1000,
            # Whisper trains from round(f * total_steps) (training.md §5.5: 0.2); >= 1: frozen
            unfreeze_whisper_fraction=0.2,
            save_every=100,
            keep_last=3,
            keep_every=ml_collections.FieldReference(None, field_type=int),
            async_save=True,
            log_every=10,
            seed=0,
            peak_flops=ml_collections.FieldReference(None, field_type=float),
            stop_at=ml_collections.FieldReference(None, field_type=int),
        )
    )
    # LoRA / QLoRA (training/lora.py): adapters on `targets` of the layers `select` matches,
    # the base (optionally int8/int4) and the Whisper encoder frozen; merged into the export
    c.lora = ml_collections.ConfigDict(
        dict(
            enabled=False,
            rank=16,
            alpha=32.0,
            targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            select=r"^(mimo_)?layers",
            quantize="none",  # none | int8 | int4 (QLoRA)
            seed=0,  # adapter init (lora_a kaiming-uniform, lora_b zeros)
        )
    )
    c.export = ml_collections.ConfigDict(dict(enabled=True))
    return c
