"""Converts a whole released Kimi-Audio folder to Orbax checkpoints, atomically.

    python -m tools.convert_kimia --src /data/Kimi-Audio-7B-Instruct \
        --glm_tokenizer /data/glm-4-voice-tokenizer --out /data/kimia-orbax

Output (loadable by `KimiAudio(model_path=out)`):
    <out>/                       LLM (Orbax) + config.json + text tokenizer files
    <out>/whisper-large-v3/      whisper encoder (Orbax)
    <out>/glm-4-voice-tokenizer/ GLM-4-Voice VQ tokenizer (Orbax)
    <out>/detokenizer/           DiT + vocoder (Orbax; converting the torch files needs torch)
Everything is built in a temporary folder next to --out and renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from absl import app, flags

_SRC = flags.DEFINE_string("src", None, "Released Kimi-Audio folder.", required=True)
_GLM = flags.DEFINE_string(
    "glm_tokenizer", None, "glm-4-voice-tokenizer folder (default <src>/glm-4-voice-tokenizer)."
)
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "LLM parameter dtype.")
_DETOK = flags.DEFINE_bool("detokenizer", True, "Also convert audio_detokenizer/ + vocoder/.")

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json")


def convert_all(src: Path, out: Path, glm: Path, dtype: str, detokenizer: bool) -> Path:
    from kimia_jax.conversion import detokenizer as detok_conv
    from kimia_jax.conversion import llm, whisper

    if out.exists():
        raise FileExistsError(f"{out} exists")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    try:
        root = stage / "m"
        stats = llm.convert_to_orbax(src, root, dtype=dtype)
        print(f"LLM: {stats['tensors']} tensors, {stats['seconds']:.1f}s")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, root / name)
        whisper.convert_folder(src / "whisper-large-v3", root / "whisper-large-v3")
        print("whisper-large-v3: done")
        whisper.convert_folder(glm, root / "glm-4-voice-tokenizer")
        print("glm-4-voice-tokenizer: done")
        if detokenizer:
            detok_conv.convert_released(src, root / "detokenizer")
            print("detokenizer + vocoder: done")
        os.rename(root, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def main(argv: list[str]) -> None:
    del argv
    src = Path(_SRC.value)
    glm = Path(_GLM.value) if _GLM.value else src / "glm-4-voice-tokenizer"
    out = convert_all(src, Path(_OUT.value), glm, _DTYPE.value, _DETOK.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
