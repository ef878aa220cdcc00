"""Pre-training mixture of the seven tasks (training.md §3.2 Table 3, §3.8): text-only reads
`text-*.array_record`, the six audio tasks read `pt_docs-*.array_record` with their own seeds and
layouts; weights [7, 1, 1, 1, 1, 1, 2] / 14, mixed after packing (token weights).

    python -m experiments.train --config=experiments/configs/pretrain_mixture.py \
        --workdir=runs/pretrain --config.model.path=/path/to/Kimi-Audio-7B-Base-init \
        --config.data_root=/data/prepared   # holds text-*.array_record, pt_docs-*.array_record

Cost: ~6.3e10 FLOP per position (9.8 B LLM) + Whisper windows of the continuous inputs; a
256 x 8192-position step is ~1.3e17 FLOP: ~2.5 s on 256 H100 at 40 % MFU. The report's 585 B
audio + 585 B text tokens (§5.1) are ~560k such steps.
"""

from experiments.configs import common

LAYOUTS = {
    "audio_only": 1.0,
    "asr": 1.0,
    "tts": 1.0,
    "audio_to_semantic": 1.0,
    "audio_to_text": 1.0,
    "audio_to_semantic_text": 2.0,
}


def get_config():
    c = common.base()
    c.model.path = ""
    c.data_root = "/data/prepared"
    c.mesh = "data=-1,fsdp=8"
    c.compute_dtype = "bfloat16"
    c.global_batch_rows = 256
    root = c.get_ref("data_root")
    tasks = [
        common.task("text_only", "pretrain", root + "/text-*.array_record", weight=7.0, seed=0)
    ]
    for i, (name, w) in enumerate(LAYOUTS.items(), start=1):
        tasks.append(
            common.task(name, "pretrain", root + "/pt_docs-*.array_record", weight=w, seed=i)
        )
    for t in tasks:
        t.layout = t.name
    c.data.tasks = common.tasks(*tasks)
    c.data.length = 8192
    c.data.max_windows = 20
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 2000
    c.loop.total_steps = 560000
    c.loop.save_every = 1000
    c.loop.keep_every = 20000
    c.loop.log_every = 50
    c.loop.peak_flops = 989e12
    return c
