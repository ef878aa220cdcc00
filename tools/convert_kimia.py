"""Converts a whole released Kimi-Audio folder to Orbax checkpoints, atomically.

    python -m tools.convert_kimia --src /data/Kimi-Audio-7B-Instruct \
        --glm_tokenizer /data/glm-4-voice-tokenizer --out /data/kimia-orbax

The output layout is described in `kimia_jax.conversion.kimia` (loadable by
`KimiAudio(model_path=out)`).
"""

from __future__ import annotations

from absl import app, flags

from kimia_jax.configs import layout

_SRC = flags.DEFINE_string("src", None, "Released Kimi-Audio folder.", required=True)
_GLM = flags.DEFINE_string(
    "glm_tokenizer",
    None,
    f"{layout.GLM_TOKENIZER_DIR} folder (default <src>/{layout.GLM_TOKENIZER_DIR}).",
)
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "LLM parameter dtype.")
_DETOK = flags.DEFINE_bool(
    "detokenizer", True, f"Also convert {layout.DIT_DIR}/ + {layout.VOCODER_DIR}/."
)


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.conversion.kimia import convert_all

    out = convert_all(_SRC.value, _OUT.value, _GLM.value, _DTYPE.value, _DETOK.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
