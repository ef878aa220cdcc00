"""Per-device memory of the Kimi-Audio-7B SFT train step, from an ahead-of-time compile.

    python -m tools.plan_memory --target=cpu:8 --mesh=fsdp=8 --batch=8
    python -m tools.plan_memory --target=v5e:16x16 --mesh=fsdp=256 --batch=256
    python -m tools.plan_memory --target=v5p:4x4x4 --mesh=fsdp=64 --batch=64   # v5p-128
    python -m tools.plan_memory --target=v5e:2x2 --mesh=fsdp=4 --batch=4 --lora_rank=16 \
        --base_quant=int8
    python -m tools.plan_memory --target=v5e:2x2 --mesh=fsdp=4 --batch=4 --model=0.5b \
        --seq=4096 --scan --remat=full --attention=xla   # the materialized-scores baseline

Nothing is allocated: the params are `jax.eval_shape` trees of the real shapes (`configs.kimia_7b`
+ whisper-large-v3), the step is the real one (`training.train_step.TrainStep`, or
`training.lora.LoraTrainStep` with --lora_rank), lowered with the mesh's shardings and compiled for
the target. Targets: `cpu:N` (N simulated host devices; XLA:CPU's buffer assignment) or a TPU
topology name (`v5e:16x16`, `v5p:4x4x4`, ...) compiled through JAX's AOT topology support with
the `libtpu` wheel (no TPU needed). Printed per device: arguments (params, optimizer state, batch),
outputs (aliased with the donated arguments), temporaries (activations, gradients, workspace),
and the peak estimate argument + output - alias + temp, against 16 GB (v5e), 95 GB (v5p), 80 GB
(H100). The LLM's training-row attention (`--attention`, `LlmConfig.attention_implementation`) is
splash attention ("pallas") for TPU targets by default: "auto" picks by `jax.default_backend()`,
which is the CPU of this host even when compiling for a TPU topology. XLA:CPU does not model TPU
layouts/fusions, so `cpu:N` numbers are a proxy for GPUs of the same mesh, not a measurement of
them.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

_TARGET = flags.DEFINE_string("target", "cpu:8", "cpu:N or a TPU topology (v5e:16x16, v5p:4x4x4).")
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Mesh, e.g. data=2,fsdp=64,tensor=2 (fsdp fills).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (rows).")
_ACCUM = flags.DEFINE_integer("accum", 1, "Micro-batches per step (gradient accumulation).")
_SEQ = flags.DEFINE_integer("seq", 8192, "Row length T.")
_WINDOWS = flags.DEFINE_integer("windows", 2, "Whisper 30 s windows per row (W).")
_MODEL = flags.DEFINE_enum("model", "7b", ["7b", "0.5b", "tiny"], "LLM shape.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_WHISPER = flags.DEFINE_bool("whisper_trainable", True, "Train the Whisper encoder.")
_REMAT = flags.DEFINE_string("remat", None, "LlmConfig.remat_policy (e.g. full), if supported.")
_SCAN = flags.DEFINE_bool("scan", None, "LlmConfig.scan_layers, if supported.")
_WREMAT = flags.DEFINE_string(
    "whisper_remat", "full", "Whisper encoder per-layer remat (TrainConfig.whisper_remat_policy)."
)
_CE_CHUNK = flags.DEFINE_integer("ce_chunk", None, "LossConfig.ce_chunk override.")
_LORA = flags.DEFINE_integer("lora_rank", 0, "LoRA rank (0: full fine-tuning).")
_QUANT = flags.DEFINE_enum("base_quant", "none", ["none", "int8", "int4"], "LoRA base weights.")
_ATTENTION = flags.DEFINE_enum(
    "attention",
    None,
    ["auto", "xla", "cudnn", "pallas"],
    "LlmConfig.attention_implementation of the training-row attention. Default: pallas (splash) "
    "for TPU targets, auto for cpu:N. 'auto' keys on jax.default_backend(), which is cpu here.",
)

GB = 1e9
BUDGETS = (("v5e 16 GB", 16 * GB), ("H100 80 GB", 80 * GB), ("v5p 95 GB", 95 * GB))


def _setup_backend(target: str) -> None:
    """Simulated CPU devices must be requested before jax is imported."""
    if target.startswith("cpu:"):
        n = int(target.split(":", 1)[1])
        flag = f"--xla_force_host_platform_device_count={n}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules and target.startswith("cpu:"):
        raise RuntimeError("plan_memory must set XLA_FLAGS before jax is imported")


def _devices(target: str):
    import jax

    if target.startswith("cpu:"):
        n = int(target.split(":", 1)[1])
        devs = jax.devices("cpu")
        if len(devs) < n:
            raise ValueError(f"asked for {n} CPU devices, XLA gave {len(devs)}")
        return devs[:n]
    from jax.experimental import topologies

    return topologies.get_topology_desc(target, "tpu").devices


def plan(
    target: str,
    mesh_spec: str,
    batch: int,
    seq: int,
    windows: int,
    *,
    model: str = "7b",
    accum: int = 1,
    compute_dtype: str = "bfloat16",
    whisper_trainable: bool = True,
    remat: str | None = None,
    scan: bool | None = None,
    whisper_remat: str = "full",
    ce_chunk: int | None = None,
    lora_rank: int = 0,
    base_quant: str = "none",
    attention: str | None = None,
    lower_only: bool = False,
) -> dict:
    """Lowers and compiles the step for `target`; returns the per-device memory numbers."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from kimia_jax import configs, sharding
    from kimia_jax.models import kimia_llm
    from kimia_jax.models import whisper_encoder as wenc
    from kimia_jax.training import lora as lora_lib
    from kimia_jax.training import train_step as ts
    from kimia_jax.training.examples import WINDOW_SAMPLES
    from kimia_jax.training.loss import LossConfig

    devices = _devices(target)
    mesh = sharding.parse_mesh(mesh_spec, devices)
    if attention is None:  # AOT from this CPU host: "auto" would see the CPU backend
        attention = "auto" if target.startswith("cpu:") else "pallas"
    llm_cfg = configs.PRESETS[model](param_dtype="float32", attention_implementation=attention)
    if scan is not None:  # the abstract params in the step's layer layout
        llm_cfg = llm_cfg.replace(scan_layers=scan)
    if llm_cfg.kimia_adaptor_input_dim == 5120:  # whisper-large-v3
        wcfg = wenc.WhisperConfig(
            d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32
        )
    else:  # a small encoder for quick checks of the tool itself
        d = llm_cfg.kimia_adaptor_input_dim // 4
        wcfg = wenc.WhisperConfig(
            d_model=d, encoder_attention_heads=4, encoder_ffn_dim=2 * d, encoder_layers=2
        )
    loss = LossConfig() if ce_chunk is None else LossConfig(ce_chunk=ce_chunk)
    tcfg = ts.TrainConfig(
        compute_dtype=compute_dtype,
        loss=loss,
        scan_layers=scan,
        remat_policy=remat,
        whisper_remat_policy=whisper_remat,
    )
    params = {
        "llm": nn.unbox(kimia_llm.abstract_params(llm_cfg)),
        "whisper": nn.unbox(wenc.abstract_params(wcfg)),
    }
    if lora_rank:
        lcfg = lora_lib.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank)
        params["llm"] = jax.eval_shape(
            lambda p: lora_lib.add_adapters(lora_lib.quantize(p, base_quant), lcfg,
                                            jax.random.key(0)), params["llm"]
        )  # fmt: skip
        step = lora_lib.LoraTrainStep(llm_cfg, wcfg, lcfg, tcfg, mesh)
        state_shape = jax.eval_shape(step.init_fn(), params)
        state_sh = step.state_shardings(params)
        fn = step.step_fn()
    else:
        step = ts.TrainStep(llm_cfg, wcfg, tcfg, mesh)
        state_shape = step.abstract_state(params, whisper_trainable=whisper_trainable)
        state_sh = step.state_shardings(state_shape)
        fn = step._step_fn(whisper_trainable)  # noqa: SLF001 - the real step, un-jitted
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, state_sh
    )
    if batch % accum:
        raise ValueError(f"batch {batch} is not a multiple of accum {accum}")
    lead = (accum, batch // accum) if accum > 1 else (batch,)
    shapes = {k: (*lead, seq) for k in ts.BATCH_AXES if k not in ("whisper_wav", "whisper_keep")}
    shapes["whisper_wav"] = (*lead, windows, WINDOW_SAMPLES)
    shapes["whisper_keep"] = (*lead, windows)
    dtypes = {
        "is_continuous": jnp.bool_, "audio_loss_mask": jnp.bool_, "text_loss_mask": jnp.bool_,
        "loss_weight": jnp.float32, "whisper_wav": jnp.int16,
    }  # fmt: skip
    abstract_batch = {}
    for k, shape in shapes.items():
        axes = ts.BATCH_AXES[k]
        full = (None,) * (len(shape) - len(axes)) + axes
        abstract_batch[k] = jax.ShapeDtypeStruct(
            shape, dtypes.get(k, jnp.int32), sharding=sharding.named_sharding(full, shape, mesh)
        )
    t0 = time.perf_counter()
    jitted = jax.jit(fn, out_shardings=(state_sh, None), donate_argnums=0)
    with sharding.mesh_context(mesh):  # what `sharding.constrain` reads while tracing
        lowered = jitted.lower(abstract_state, abstract_batch)
    if lower_only:
        return {"lowered": lowered, "state": abstract_state}
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    out = dict(
        target=target,
        device_kind=devices[0].device_kind,
        mesh=sharding.describe(mesh),
        model=model,
        params=n_params,
        lora_rank=lora_rank,
        base_quant=base_quant,
        batch=batch,
        accum=accum,
        seq=seq,
        windows=windows,
        compute_dtype=compute_dtype,
        remat=remat,
        scan=scan,
        whisper_remat=whisper_remat,
        whisper_trainable=whisper_trainable,
        attention=attention,
        compile_s=seconds,
        argument=ma.argument_size_in_bytes,
        output=ma.output_size_in_bytes,
        alias=ma.alias_size_in_bytes,
        temp=ma.temp_size_in_bytes,
        code=ma.generated_code_size_in_bytes,
    )
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def report(r: dict) -> str:
    fits = ", ".join(f"{name}: {'fits' if r['peak'] <= b else 'NO'}" for name, b in BUDGETS)
    return (
        f"{r['target']} ({r['device_kind']}), mesh {r['mesh']}, {r['model']} "
        f"({r['params'] / 1e9:.2f} B params), lora_rank {r['lora_rank']} base {r['base_quant']}, "
        f"batch {r['batch']} (accum {r['accum']}) x {r['seq']}, W={r['windows']}, "
        f"{r['compute_dtype']}, remat {r['remat']}, scan {r['scan']}, whisper "
        f"{'trained' if r['whisper_trainable'] else 'frozen'} (remat {r['whisper_remat']}), "
        f"attention {r['attention']}; "
        "compiled in "
        f"{r['compile_s']:.0f} s\n"
        f"  per device: argument {r['argument'] / GB:.2f} GB, output {r['output'] / GB:.2f} GB "
        f"(aliased {r['alias'] / GB:.2f}), temp {r['temp'] / GB:.2f} GB -> peak "
        f"{r['peak'] / GB:.2f} GB  [{fits}]"
    )


def main(argv: list[str]) -> None:
    del argv
    r = plan(
        _TARGET.value,
        _MESH.value,
        _BATCH.value,
        _SEQ.value,
        _WINDOWS.value,
        model=_MODEL.value,
        accum=_ACCUM.value,
        compute_dtype=_DTYPE.value,
        whisper_trainable=_WHISPER.value,
        remat=_REMAT.value,
        scan=_SCAN.value,
        whisper_remat=_WREMAT.value,
        ce_chunk=_CE_CHUNK.value,
        lora_rank=_LORA.value,
        base_quant=_QUANT.value,
        attention=_ATTENTION.value,
    )
    print(report(r))


if __name__ == "__main__":
    _setup_backend(
        next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), "cpu:8")
    )
    app.run(main)
