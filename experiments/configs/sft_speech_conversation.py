"""SFT, speech conversation (audio in, text + delayed audio out; training.md §4.4) mixed with
understanding data, on the released Kimi-Audio-7B-Instruct.

    python -m experiments.train --config=experiments/configs/sft_speech_conversation.py \
        --workdir=runs/sft_s2s --config.model.path=/path/to/Kimi-Audio-7B-Instruct \
        --config.data.tasks.s2s.path='/data/sft-s2s-*.array_record' \
        --config.data.tasks.understanding.path=/data/understanding.jsonl

Records: `sft-<task>-*.array_record` (training.md §4.1 schema, msgpack) or the official jsonl.
Cost: as sft_asr (~3.3e16 FLOP per 64 x 8192 step, ~1.5 s on 64 H100 at 40 % MFU); both heads
are trained (the audio head's CE over 168448 ids is chunked: loss.ce_chunk).
"""

from experiments.configs import common


def get_config():
    c = common.base()
    c.model.path = ""
    c.mesh = "data=1,fsdp=-1"
    c.compute_dtype = "bfloat16"
    c.global_batch_rows = 64
    c.data.tasks = common.tasks(
        common.task("s2s", "sft_array_record", "", weight=3.0, seed=1),
        common.task("understanding", "sft_jsonl", "", weight=1.0, seed=2),
    )
    c.data.length = 8192
    c.data.max_windows = 16
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 100
    c.loop.total_steps = 4000
    c.loop.save_every = 200
    c.loop.keep_every = 1000
    c.loop.log_every = 10
    c.loop.peak_flops = 989e12
    return c
