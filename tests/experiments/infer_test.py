"""The launcher's sampling flags are generated from `Sampling` (names, types, defaults, help)."""

import dataclasses

from absl import flags

from experiments import infer
from kimia_jax.inference.sampler import Sampling


def test_sampling_flags_are_the_sampling_fields():
    fv = flags.FLAGS
    for f in dataclasses.fields(Sampling):
        assert fv[f.name].default == f.default and fv[f.name].help == f.metadata["help"]
    try:
        fv(["infer", "--model_path=/m", "--audio_temperature=0.8", "--audio_top_k=10",
            "--max_new_tokens=32"])  # fmt: skip
        got = infer.sampling_from_flags()
    finally:
        fv.unparse_flags()
    assert got == Sampling(audio_temperature=0.8, audio_top_k=10, max_new_tokens=32)
    assert isinstance(got.audio_temperature, float) and isinstance(got.audio_top_k, int)
