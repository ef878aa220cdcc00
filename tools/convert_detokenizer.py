"""Converts the released detokenizer (audio_detokenizer/ + vocoder/, torch .pt) to Orbax.

    python -m tools.convert_detokenizer --src /data/Kimi-Audio-7B-Instruct --dst /data/detok-orbax

Needs torch (reads the .pt files). Written atomically; `--overwrite` replaces an existing --dst,
and staging folders left by an interrupted run are removed (and reported) first.
"""

from __future__ import annotations

from absl import app, flags

from kimia_jax.configs import layout

_SRC = flags.DEFINE_string(
    "src", None, f"Released model folder (holds {layout.DIT_DIR}/ and {layout.VOCODER_DIR}/).",
    required=True,
)  # fmt: skip
_DST = flags.DEFINE_string("dst", None, "Output Orbax folder.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.conversion import detokenizer as conv
    from kimia_jax.conversion.common import peak_rss_mib
    from kimia_jax.conversion.kimia import prepare_output

    prepare_output(_DST.value, overwrite=_OVERWRITE.value)
    out = conv.convert_released(_SRC.value, _DST.value, overwrite=_OVERWRITE.value)
    print(f"wrote {out} (peak RSS {peak_rss_mib():.0f} MiB)")


if __name__ == "__main__":
    app.run(main)
