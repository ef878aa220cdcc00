"""SFT, ASR only, on the released Kimi-Audio-7B-Instruct (training.md §4.3, §5.2, §5.5).

    python -m experiments.train --config=experiments/configs/sft_asr.py --workdir=runs/sft_asr \
        --config.model.path=/path/to/Kimi-Audio-7B-Instruct \
        --config.data.tasks.asr.path=/path/to/asr.jsonl   # official SFT jsonl with audio_tokens

Multi-host: run the same command on every host (TPU / SLURM: --config.distributed=True; else set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Cost: the LLM is ~9.8 B parameters + 0.64 B Whisper encoder (training.md §5.5): ~6.3e10 FLOP per
trained position, so a 64 x 8192-position step is ~3.3e16 FLOP (+ ~25 % for Whisper windows):
~1.5 s per step on 64 H100 at 40 % MFU; 2000 steps ~ 1 hour. fp32 master weights + AdamW moments
need ~170 GB: shard with FSDP (--config.mesh=data=1,fsdp=-1) over >= 16 accelerators of 80 GB.
"""

from experiments.configs import common


def get_config():
    c = common.base()
    c.model.path = ""
    c.mesh = "data=1,fsdp=-1"
    c.compute_dtype = "bfloat16"
    c.global_batch_rows = 64
    c.data.tasks = common.tasks(common.task("asr", "sft_jsonl", "", seed=0))
    c.data.length = 8192
    c.data.max_windows = 24
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 100
    c.loop.total_steps = 2000
    c.loop.save_every = 200
    c.loop.keep_every = 1000
    c.loop.unfreeze_whisper_fraction = 0.2
    c.loop.log_every = 10
    c.loop.peak_flops = 989e12  # H100 SXM dense bf16; set for your accelerator
    return c
