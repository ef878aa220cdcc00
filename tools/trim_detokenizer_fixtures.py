"""Copies the detokenizer fixtures into tests/fixtures/detokenizer/, dropping keys the tests do not read.

    python -m tools.trim_detokenizer_fixtures --src=/work/shared/fixtures/detokenizer

case_b.npz (3.4 MB) loses its raw per-chunk vocoder outputs and block-level intermediates (the
stitched `wav_full`, per-chunk DiT outputs, ODE results and offsets stay); every file is written
with np.savez_compressed. The tiny checkpoint folder is copied verbatim.
"""

import re
import shutil
from pathlib import Path

import numpy as np
from absl import app, flags

_SRC = flags.DEFINE_string("src", "/work/shared/fixtures/detokenizer", "official fixture folder")
_DST = flags.DEFINE_string("dst", "tests/fixtures/detokenizer", "repo fixture folder")

DROP = {
    "case_a.npz": [],
    "case_b.npz": [r"chunk\d+_vocoder_out_wav", r"chunk\d+_step0_block\d_out", r"chunk\d+_step0_input_linear"],
    "case_c.npz": [],
}


def main(argv):
    del argv
    src, dst = Path(_SRC.value), Path(_DST.value)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "Kimi-Audio-7B-Instruct", dst / "Kimi-Audio-7B-Instruct", dirs_exist_ok=True)
    shutil.copy(src / "README.md", dst / "README.md")
    for name, drop in DROP.items():
        z = np.load(src / name)
        keep = {k: z[k] for k in z.files if not any(re.fullmatch(p, k) for p in drop)}
        np.savez_compressed(dst / name, **keep)
        print(name, f"{len(keep)}/{len(z.files)} keys", f"{(dst / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    app.run(main)
