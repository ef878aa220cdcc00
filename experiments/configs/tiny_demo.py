"""Tiny demo: fine-tune the tiny random model on two real LibriSpeech clips (ASR).

    python -m experiments.train --config=experiments/configs/tiny_demo.py --workdir=/tmp/tiny_demo

Cost: about a minute of compilation plus ~0.3 s per step on 2 CPU cores (tiny model: whisper
d_model 24, LLM hidden 64; rows of 512 positions, 2 windows); no accelerator needed. Also the
config of the resumption tests (kill -9 / SIGTERM + restart) and of `make finetune-demo`.
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
