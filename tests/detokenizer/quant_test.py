"""The detokenizer with int8 DiT weights (`Detokenizer(quantize="int8")`, `quant.DIT`) against
fp32, on the official cases streamed chunk by chunk with their recorded noise (tiny fixture DiT,
hidden 64, 2 blocks; fp32 compute, CPU).

Measured: waveform max |int8 - fp32| / max |fp32| 8.5e-3 (case a), 9.7e-3 (b), 1.03e-2 (c);
SNR 43.5 / 42.8 / 43.4 dB. DiT weights: 163,840 bytes int8 + scales, 394,560 float (the
embedding and the small projections) vs 1,017,152 fp32. At the released width the DiT
evaluation's output error is 2.9e-2 relative, below bf16's 3.5e-2 (tools/bench_dit_quant.py).
"""

import numpy as np
import pytest

from kimia_jax.detokenizer import Detokenizer, plan_chunks
from kimia_jax.layers import quant
from tests.detokenizer_helpers import chunk_noise


@pytest.fixture(scope="module")
def int8_detok(detok):
    return Detokenizer(detok.dit_cfg, detok.vocoder_cfg, detok.params, detok.mel_norm,
                       streaming=detok.streaming, quantize="int8")  # fmt: skip


def test_int8_dit_weights(detok, int8_detok):
    s = quant.summary(int8_detok.params["dit"])
    assert s == {"quantized": 163840, "float": 394560}
    assert quant.nbytes(detok.params["dit"]) == 1017152
    assert quant.summary(int8_detok.params["vocoder"])["quantized"] == 0  # convolutions stay
    with pytest.raises(ValueError, match="quantize must be None, 'none' or 'int8'"):
        Detokenizer(detok.dit_cfg, detok.vocoder_cfg, detok.params, detok.mel_norm,
                    quantize="int4")  # fmt: skip


@pytest.mark.parametrize("name", ["c"])  # the shortest case (3 chunks); a, b: docstring
def test_int8_dit_waveform_error(int8_detok, runs, cases, name):
    c = cases[name]
    noise = chunk_noise(c)
    state, pieces = int8_detok.new_state(), []
    for s, e, fin in plan_chunks(c["semantic_tokens"].shape[1]):
        wav, state = int8_detok.detokenize_chunk(
            state, c["semantic_tokens"][0, s:e], is_final=fin, noise=noise
        )
        pieces.append(np.asarray(wav))
    got, ref = np.concatenate(pieces), np.concatenate(runs[name]["pieces"])
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    snr = 10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum())
    assert err <= 1.5e-2 and snr >= 40, (err, snr)
