"""Writes a tiny random Kimi-Audio folder (all five parts) in the released on-disk layout.

    python -m tools.make_tiny_checkpoint --out /tmp/tiny-Kimi-Audio-7B-Instruct

Load it exactly like the real release: `KimiAudio(model_path=...)`, `tools.convert_kimia`, ...
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random LLM weights.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "LLM shard dtype.")


def main(argv: list[str]) -> None:
    del argv
    from kimia_jax.testing import tiny_kimia

    out = tiny_kimia.write(_OUT.value, seed=_SEED.value, dtype=_DTYPE.value)
    print(f"wrote tiny Kimi-Audio folder to {out}")


if __name__ == "__main__":
    app.run(main)
