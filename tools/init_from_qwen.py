"""Builds a Kimi-Audio LLM checkpoint for pre-training from a plain Qwen2.5 HF checkpoint.

    python -m tools.init_from_qwen --qwen_dir /data/Qwen2.5-7B --out /data/kimia-7b-init \
        --tokenizer_from /data/Kimi-Audio-7B-Instruct

Shared layers, final norm and text head are copied bit-identically, the vocabulary is extended
with the Kimi specials and 16384 audio codes, and the MIMO layers, mimo_norm, mimo_output, new
rows and the adaptor are initialised as `kimia_jax/conversion/qwen_init.py` documents (spec
training.md §3.7). The output is the released safetensors layout: `tools.convert_llm` or
`kimia_jax.conversion.llm.load` read it. The Whisper encoder is not part of the LLM folder: use
the `whisper-large-v3/` of a Kimi-Audio release (or OpenAI's) with it.
"""

from absl import app, flags

from kimia_jax.conversion import qwen_init

_QWEN = flags.DEFINE_string("qwen_dir", None, "Qwen2/Qwen2.5 HF folder.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (written atomically).", required=True)
_TOK = flags.DEFINE_string(
    "tokenizer_from", None, "Kimi-Audio folder whose tokenizer files are copied along."
)
_MIMO_LAYERS = flags.DEFINE_integer("mimo_layers", 6, "Layers of the audio (MIMO) branch.")
_MIMO_FROM = flags.DEFINE_integer(
    "mimo_from_layer", None, "Main layer seeding the MIMO branch (default L - mimo_layers - 1)."
)
_MIMO_INIT = flags.DEFINE_enum(
    "mimo_init", "random", ["random", "copy_top"], "MIMO layers: random (report) or copies."
)
_NOISE = flags.DEFINE_float("row_noise", 0.01, "Noise of mean-initialised rows (x per-dim std).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random tensor.")
_SHARD = flags.DEFINE_integer("max_shard_mib", 2048, "Largest output shard, MiB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")


def main(argv: list[str]) -> None:
    del argv
    opts = qwen_init.InitOptions(
        kimia_mimo_layers=_MIMO_LAYERS.value,
        mimo_from_layer=_MIMO_FROM.value,
        mimo_init=_MIMO_INIT.value,
        row_noise=_NOISE.value,
        seed=_SEED.value,
    )
    cfg = qwen_init.init_from_qwen(
        _QWEN.value,
        _OUT.value,
        opts,
        tokenizer_from=_TOK.value,
        max_shard_bytes=_SHARD.value * 2**20,
        overwrite=_OVERWRITE.value,
    )
    print(
        f"wrote {_OUT.value}: vocab {cfg.vocab_size}, {cfg.num_hidden_layers} + "
        f"{cfg.kimia_mimo_layers} layers (MIMO from layer "
        f"{cfg.kimia_mimo_transformer_from_layer_index})"
    )


if __name__ == "__main__":
    app.run(main)
