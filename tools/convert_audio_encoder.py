"""Convert a released audio encoder folder (glm-4-voice-tokenizer or whisper-large-v3) to Orbax.

    python -m tools.convert_audio_encoder --src=glm-4-voice-tokenizer --dst=ckpt/glm4_tokenizer
    python -m tools.convert_audio_encoder \
        --src=Kimi-Audio-7B-Instruct/whisper-large-v3 --dst=ckpt/whisper

The kind is read from config.json (a WhisperVQ config has quantize_vocab_size). Tensor by tensor
(peak host memory ~ one tensor), verified, written atomically. Loading straight from the HF folder
works too (`GlmTokenizer.from_pretrained(folder)`); converting only saves the re-check at start-up.
"""

from __future__ import annotations

from absl import app, flags

_SRC = flags.DEFINE_string("src", None, "HF folder (config.json + safetensors)", required=True)
_DST = flags.DEFINE_string("dst", None, "output Orbax directory", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.conversion import whisper as conv
    from kimia_jax.conversion.common import peak_rss_mib
    from kimia_jax.conversion.kimia import prepare_output

    prepare_output(_DST.value, overwrite=_OVERWRITE.value)

    out = conv.convert_folder(_SRC.value, _DST.value, overwrite=_OVERWRITE.value)
    print(f"wrote {out} (peak RSS {peak_rss_mib():.0f} MiB)")


if __name__ == "__main__":
    app.run(main)
