"""Tiny demo: fine-tune the tiny random model on two real LibriSpeech clips (ASR).

    python -m experiments.train --config=experiments/configs/tiny_demo.py --workdir=/tmp/tiny_demo

Cost (measured on a shared 2-core AMD EPYC, other jobs running): ~1 min of start-up and
compilation, then 2.3-5 s per step (2 rows of 512 positions, one 30 s Whisper window each); no
accelerator needed. `make finetune-demo` (this config, constant lr) reached WER 0 on both clips
after 80 steps, 511 s in all. Also the config of the resumption tests (kill -9 / SIGTERM).
"""

from experiments.configs import common


def get_config():
    c = common.base()
    c.model.path = "tiny"
    c.global_batch_rows = 2
    c.data.tasks = common.tasks(common.task("asr", "asr_clips", seed=0))
    c.data.length = 512
    c.data.max_windows = 1
    c.data.buffer_size = 4
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.0
    c.loop.total_steps = 60
    c.loop.unfreeze_whisper_fraction = 0.0
    c.loop.save_every = 10
    c.loop.log_every = 1
    return c
