"""LoRA / QLoRA SFT (ASR) of the released Kimi-Audio-7B-Instruct (training/lora.py).

    python -m experiments.train --config=experiments/configs/sft_lora.py --workdir=runs/sft_lora \
        --config.model.path=/path/to/Kimi-Audio-7B-Instruct \
        --config.data.tasks.asr.path=/path/to/asr.jsonl   # official SFT jsonl with audio_tokens

Adapters (rank 16, alpha 32) on every attention and MLP projection of the 28 main layers (ASR
trains the text head only: MIMO-layer adapters would get no gradient; for data with audio targets
add them with --config.lora.select='^(mimo_)?layers'); the base is int8
(`--config.lora.quantize=int4` for 4-bit, `none` for the fp32 base) and the Whisper encoder stays
frozen. Checkpoints hold the adapters + their AdamW moments only (~0.5 GB
instead of ~170 GB); a restart re-reads the base from model.path. At the end the adapters are merged
(W + alpha / r * B A) and exported like any fine-tuned model (export/released, export/orbax), which
`KimiAudio` loads. Try it on the tiny model in a minute (CPU):

    python -m experiments.train --config=experiments/configs/sft_lora.py --workdir=/tmp/lora \
        --config.model.path=tiny --config.data.tasks.asr.kind=asr_clips \
        --config.data.length=512 --config.data.max_windows=1 --config.global_batch_rows=2 \
        --config.compute_dtype=float32 --config.lora.rank=4 --config.optim.learning_rate=1e-2 \
        --config.loop.total_steps=8

Cost (estimates from the shapes, not measured on a GPU): 28 layers x 1.44 M adapter params = 40 M
trainable; no weight gradients for the base, so ~4 N = 3.9e10 FLOP per trained position: a step of
8 rows x 8192 positions is ~2.6e15 FLOP, ~6.5 s on one H100 at 40 % MFU; 2000 steps ~3.6 hours.
Memory: int8 base ~9.8 GB + fp32 Whisper 2.6 GB + adapters and moments 0.5 GB + activations:
one 80 GB accelerator, or data-parallel over more (--config.mesh=data=-1). Measured on the tiny
model (2-core EPYC, shared, tests/training/lora_trainer_test.py): ~1 min start-up and compilation,
then ~1-3 s per step.
"""

from experiments.configs import common


def get_config():
    c = common.base()
    c.model.path = ""
    c.mesh = "data=-1,fsdp=1"
    c.compute_dtype = "bfloat16"
    c.global_batch_rows = 8
    c.data.tasks = common.tasks(common.task("asr", "sft_jsonl", "", seed=0))
    c.data.length = 8192
    c.data.max_windows = 24
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.quantize = "int8"
    c.lora.select = r"^layers_"  # main layers (the text head's path)
    c.optim.learning_rate = 1e-4  # adapters take a larger step than full fine-tuning (1e-5)
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.loop.total_steps = 2000
    c.loop.save_every = 200
    c.loop.unfreeze_whisper_fraction = 1.0  # frozen throughout (LoRA trains adapters only)
    c.loop.log_every = 10
    c.loop.peak_flops = 989e12  # H100 SXM dense bf16; set for your accelerator
    return c
