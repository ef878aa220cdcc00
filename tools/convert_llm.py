"""Converts a released Kimi-Audio LLM folder (HF safetensors) to an Orbax checkpoint.

    python -m tools.convert_llm --hf_dir /path/Kimi-Audio-7B-Instruct --out /path/kimia-7b-orbax

Reads tensor by tensor (peak host RAM beyond the converted params is about one tensor), checks
every name and shape, and writes the output directory atomically. On the 7B release (19.5 GB of
bf16 shards) expect the output to take the same space in bfloat16, about half with
--quantize=int8 (the decode matrices int8 + fp32 row scales; the VQ adaptor, norms, biases in
--dtype), which `KimiAudio` / `llm.load` restore as int8 without reading float weights.
"""

from absl import app, flags, logging

from kimia_jax.conversion import llm

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Released folder: config.json + safetensors.", required=True
)
_OUT = flags.DEFINE_string(
    "out", None, "Output Orbax directory (created atomically).", required=True
)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored parameter dtype.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "none", ["none", "int8", "int4"],
    "Store the LLM's decode matrices (layer projections, both heads, the embedding) weight-only "
    "quantized (layers/quant.py: int8 per output channel, int4 per 64 inputs; the rest in "
    "--dtype); KimiAudio(<out>) then loads them as they are, without the float weights.",
)  # fmt: skip
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.conversion.kimia import prepare_output

    prepare_output(_OUT.value, overwrite=_OVERWRITE.value)
    stats = llm.convert_to_orbax(
        _HF_DIR.value, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
        quantize=None if _QUANTIZE.value == "none" else _QUANTIZE.value,
    )  # fmt: skip
    logging.info("done: %s", stats)
    print(
        f"converted {stats['tensors']} tensors in {stats['seconds']:.1f}s, "
        f"peak RSS {stats['peak_rss_mib']:.0f} MiB -> {_OUT.value}"
    )


if __name__ == "__main__":
    app.run(main)
