"""Train Kimi-Audio.

    python -m experiments.train --config=experiments/configs/<name>.py --workdir=DIR

absl flags + an `ml_collections` config file (big_vision / MaxText convention); any field can be
overridden on the command line, e.g. `--config.loop.total_steps=50`,
`--config.optim.learning_rate=1e-4`.
The same command runs on one CPU, one GPU host or every host of a pod: with
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` set (or `--config.distributed`
on TPU / SLURM, where JAX finds them), `jax.distributed.initialize()` runs first and every process
reads its own rows of the global batch. Restarting the same command resumes from the newest
complete checkpoint in `DIR/checkpoints` (exactly: same batches, same params).

The workdir gets: config.json (the resolved config), git_revision.txt, checkpoints/, tensorboard/,
metrics.jsonl and, at the end, export/ (the released layout and our Orbax layout; a LoRA run
exports the merged weights W + (alpha / r) B A, loadable like any fine-tuned model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, export).")
flags.mark_flags_as_required(["config", "workdir"])

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` when the environment (or the config) says so."""
    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif config.get("distributed", False):
        jax.distributed.initialize()


def train_config(config):
    """The step's `TrainConfig` from the experiment config (optim, loss, dtype, layer layout and
    remat of the LLM and of the Whisper encoder)."""
    from kimia_jax.training.loss import LossConfig
    from kimia_jax.training.optim import OptimConfig
    from kimia_jax.training.train_step import TrainConfig

    optim_cfg = OptimConfig(**{**config.optim.to_dict(), "total_steps": config.loop.total_steps})
    model = config.model
    return TrainConfig(
        optim=optim_cfg,
        loss=LossConfig(**config.loss.to_dict()),
        compute_dtype=config.compute_dtype,
        packed=True,
        scan_layers=model.get("scan_layers"),
        remat_policy=model.get("remat_policy"),
        whisper_remat_policy=model.get("whisper_remat_policy", "full"),
    )


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown (git not available)"


def model_dir(config, workdir: Path) -> Path:
    """The model to start from: a released / converted folder, or `tiny` (generated here)."""
    if not config.model.path:
        raise ValueError(
            "set --config.model.path to a released or converted Kimi-Audio folder (or 'tiny')"
        )
    if config.model.path != "tiny":
        p = Path(config.model.path)
        if not p.is_dir():
            raise FileNotFoundError(f"--config.model.path={p} is not a model folder")
        return p
    import jax

    out = workdir / "tiny-model"
    if jax.process_index() == 0 and not (out / "config.json").exists():
        from kimia_jax.fileio import atomic_dir
        from kimia_jax.testing import tiny_kimia

        with atomic_dir(out) as tmp:
            tiny_kimia.write(tmp, seed=config.model.seed, dtype="float32", detokenizer=False)
    _sync("tiny-model")
    return out


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepare_asr_clips(
    root: Path, clips: Path, out: Path, instruction: str, repeat: int = 1
) -> Path:
    """Clips + transcripts.json -> an official-schema SFT jsonl, audio tokens from the model's
    GLM-4-Voice tokenizer (offset by kimia_token_offset); every clip `repeat` times (enough
    records for a wide global batch: each row reads its own slice)."""
    import jax

    if jax.process_index() == 0 and not out.exists():
        from kimia_jax.audio.tokenizer import GlmTokenizer
        from kimia_jax.configs import layout

        offset = json.loads((root / layout.CONFIG_JSON).read_text())["kimia_token_offset"]
        glm = GlmTokenizer.from_pretrained(root / layout.GLM_TOKENIZER_DIR)
        transcripts = json.loads((clips / "transcripts.json").read_text())
        names = sorted(transcripts)
        codes = glm.tokenize([str(clips / n) for n in names])
        lines = []
        for n, c in zip(names, codes, strict=True):
            conv = [
                {"role": "user", "message_type": "text", "content": instruction},
                {
                    "role": "user",
                    "message_type": "audio",
                    "content": str((clips / n).resolve()),
                    "audio_tokens": (c.astype(int) + offset).tolist(),
                },
                {"role": "assistant", "message_type": "text", "content": transcripts[n]},
            ]
            lines.append(json.dumps({"task_type": "understanding", "conversation": conv}))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines * repeat) + "\n")
        os.replace(tmp, out)
    _sync("asr-clips")
    return out


def build_tasks(config, root: Path, workdir: Path, tokenizer, offset: int, num_codes: int):
    from kimia_jax.training import data
    from kimia_jax.training.examples import PretrainExampleBuilder, SftExampleBuilder, Truncation

    trunc = Truncation(max_length=config.data.length, policy=config.data.overflow)
    sft = SftExampleBuilder(
        tokenizer, kimia_token_offset=offset, num_audio_codes=num_codes, truncation=trunc
    )
    pt = PretrainExampleBuilder(tokenizer.extra_tokens, kimia_token_offset=offset, truncation=trunc)
    tasks = []
    names = [n for n in config.data.tasks.get("order", "").split(",") if n]
    if not names:
        raise ValueError("the config has no data tasks (config.data.tasks)")
    for name in names:
        t = config.data.tasks[name]
        if t.kind == "asr_clips":
            clips = Path(t.path) if t.path else ASSETS / "librispeech"
            jsonl = prepare_asr_clips(
                root,
                clips,
                workdir / "data" / f"{t.name}.jsonl",
                t.instruction,
                config.data.asr_repeat,
            )
            source, build = data.JsonlSource(jsonl), data.sft_builder(sft)
        elif t.kind == "sft_jsonl":
            source, build = data.JsonlSource(t.path), data.sft_builder(sft)
        elif t.kind == "sft_array_record":
            source, build = data.ArrayRecordSource(t.path), data.sft_builder(sft)
        elif t.kind == "pretrain":
            source, build = data.ArrayRecordSource(t.path), data.pretrain_builder(pt, t.layout)
        else:
            raise ValueError(
                f"data task {t.name!r}: kind {t.kind!r} is not one of asr_clips, sft_jsonl, "
                "sft_array_record, pretrain"
            )
        tasks.append(data.Task(t.name, source, build, weight=t.weight, seed=t.seed))
    return tasks


def lora_config(config):
    """training.lora.LoraConfig from `config.lora` (None when LoRA is off)."""
    if not config.get("lora") or not config.lora.enabled:
        return None
    from kimia_jax.training.lora import LoraConfig

    targets = tuple(t.strip() for t in config.lora.targets.split(",") if t.strip())
    return LoraConfig(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=targets, select=config.lora.select
    )


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    maybe_initialize_distributed(config)
    logging.set_verbosity(logging.WARNING)
    import grain
    import jax

    from kimia_jax import sharding
    from kimia_jax.configs import layout
    from kimia_jax.conversion import llm as llm_conv
    from kimia_jax.conversion import whisper as whisper_conv
    from kimia_jax.models import kimia_llm
    from kimia_jax.text.tokenizer import TextTokenizer
    from kimia_jax.training import data, export
    from kimia_jax.training.train_step import TrainStep
    from kimia_jax.training.trainer import LoopConfig, Trainer

    workdir = Path(_WORKDIR.value).absolute()
    t_start = time.perf_counter()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True))
        (workdir / "git_revision.txt").write_text(git_revision() + "\n")
    _sync("workdir")

    root = model_dir(config, workdir)
    mesh = sharding.parse_mesh(config.mesh)
    # float weights to train (a folder converted with --quantize is refused, named)
    lcfg, lparams = llm_conv.load(root, dtype="float32", mesh=mesh, quantize="none")
    wcfg, wparams = whisper_conv.load(root / layout.WHISPER_DIR, dtype="float32", mesh=mesh)
    tok = TextTokenizer.from_pretrained(root)
    offset = lcfg.kimia_token_offset
    tasks = build_tasks(config, root, workdir, tok, offset, lcfg.vocab_size - offset)

    spec = data.RowSpec(
        length=config.data.length,
        max_windows=config.data.max_windows,
        pad_id=lcfg.pad_token_id if hasattr(lcfg, "pad_token_id") else tok.pad_id,
        max_segments=config.loss.max_segments,
        wav_dtype=config.data.wav_dtype,
    )
    stats = data.PackingStats()
    dataset = data.batches(
        tasks,
        spec,
        config.global_batch_rows,
        buffer_size=config.data.buffer_size,
        prefetch_workers=config.data.prefetch_workers,
        stats=stats,
        read=grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=16),
    )
    total = config.loop.total_steps
    train_cfg = train_config(config)
    loop_kw = config.loop.to_dict()
    frac = loop_kw.pop("unfreeze_whisper_fraction")
    loop_kw["unfreeze_whisper_at"] = round(frac * total) if frac < 1 else None
    params = {"llm": lparams, "whisper": wparams}
    lora_cfg = lora_config(config)
    if lora_cfg is None:
        step = TrainStep(lcfg, wcfg, train_cfg, mesh)
    else:
        from kimia_jax.training import lora

        if loop_kw["unfreeze_whisper_at"] is not None:
            raise ValueError(
                "LoRA keeps the Whisper encoder frozen: set "
                "--config.loop.unfreeze_whisper_fraction=1 (got "
                f"{frac})"
            )
        base = lora.quantize(lparams, config.lora.quantize)
        params["llm"] = lora.add_adapters(base, lora_cfg, jax.random.key(config.lora.seed))
        step = lora.LoraTrainStep(lcfg, wcfg, lora_cfg, train_cfg, mesh)
        if jax.process_index() == 0:
            n = sum(x.size for x in jax.tree.leaves(lora.split(params["llm"])[0]))
            print(f"LoRA: {len(lora.target_paths(base, lora_cfg))} adapted weights, {n} params")
    trainer = Trainer(
        step,
        params,
        dataset,
        workdir,
        LoopConfig(**loop_kw),
        task_names=[t.name for t in tasks],
    )
    state, last = trainer.run()
    if jax.process_index() == 0:
        print(
            f"packing: {stats.examples} examples in {stats.rows} rows, efficiency "
            f"{stats.efficiency:.3f}; last step: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if not k.startswith("loss_"))
        )
    if int(state.step) >= total and config.export.enabled:
        trained = state.params
        if lora_cfg is not None:  # merge-and-export: W + (alpha / r) B A, the released layout
            trained = {"llm": step.merged(state), "whisper": state.params["frozen"]["whisper"]}
        # the released / Orbax layouts hold unrolled layers (lcfg is the checkpoint's config)
        trained = {**trained, "llm": kimia_llm.to_layout(trained["llm"], lcfg)}
        out = export.export_all(root, workdir / "export", trained, lcfg, wcfg)
        if jax.process_index() == 0:
            print(f"exported: {out['released']} (released layout), {out['orbax']} (Orbax)")
    print(f"done in {time.perf_counter() - t_start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
