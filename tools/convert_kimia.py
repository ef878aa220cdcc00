"""Converts a whole released Kimi-Audio folder to Orbax checkpoints, atomically.

    python -m tools.convert_kimia --src /data/Kimi-Audio-7B-Instruct \
        --glm_tokenizer /data/glm-4-voice-tokenizer --out /data/kimia-orbax [--quantize=int8]

The output layout is described in `kimia_jax.conversion.kimia` (loadable by
`KimiAudio(model_path=out)`). `--overwrite` replaces an existing --out; staging folders left by an
interrupted run are removed (and reported with their size) first.
"""

from __future__ import annotations

from absl import app, flags

from kimia_jax.configs import layout
from kimia_jax.conversion.kimia import convert_all  # noqa: F401 (the notebook imports it here)

_SRC = flags.DEFINE_string("src", None, "Released Kimi-Audio folder.", required=True)
_GLM = flags.DEFINE_string(
    "glm_tokenizer",
    None,
    f"{layout.GLM_TOKENIZER_DIR} folder (default <src>/{layout.GLM_TOKENIZER_DIR}).",
)
_OUT = flags.DEFINE_string(
    "out", None, "Output folder (must not exist unless --overwrite).", required=True
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "none", ["none", "int8", "int4"],
    "Store the LLM's decode matrices (layer projections, both heads, the embedding) weight-only "
    "quantized (layers/quant.py: int8 per output channel, int4 per 64 inputs; the rest in "
    "--dtype); KimiAudio(<out>) then loads them as they are, without the float weights.",
)  # fmt: skip
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "LLM parameter dtype.")
_DETOK = flags.DEFINE_bool(
    "detokenizer", True, f"Also convert {layout.DIT_DIR}/ + {layout.VOCODER_DIR}/."
)


def main(argv: list[str]) -> None:
    del argv
    quantize = None if _QUANTIZE.value == "none" else _QUANTIZE.value
    out = convert_all(_SRC.value, _OUT.value, _GLM.value, _DTYPE.value, _DETOK.value,
                      overwrite=_OVERWRITE.value, quantize=quantize)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
