"""Measures conversion time and peak host RAM on a random released-layout LLM folder.

    python -m tools.measure_conversion --size=0.5b

Writes a bf16 Qwen2.5-0.5B-shaped Kimi LLM folder (sharded safetensors + index) to a temp dir,
converts it to Orbax in a fresh subprocess, and prints: RSS before loading, bytes of the converted
params, the largest single tensor, and peak RSS. Conversion is tensor-by-tensor, so peak RSS -
(RSS before + params) should stay near one tensor (plus Orbax's write buffers).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

_SIZE = flags.DEFINE_enum("size", "0.5b", ["tiny", "0.5b"], "Model shape.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Converted dtype.")

_CHILD = """
import json, sys
from kimia_jax.conversion import llm
stats = llm.convert_to_orbax(sys.argv[1], sys.argv[2], dtype=sys.argv[3], progress=False)
print("STATS" + json.dumps(stats))
"""


_WRITER = """
import sys
from kimia_jax.testing import tiny_llm
tiny_llm.write(sys.argv[1], config=tiny_llm.sized_config(sys.argv[2]), dtype="bfloat16",
               num_shards=4)
"""


def main(argv):
    del argv
    # Writer and converter run in separate child processes: Linux carries ru_maxrss across
    # fork+exec, so a child forked from a large parent would report the parent's peak.
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        subprocess.run([sys.executable, "-c", _WRITER, str(hf), _SIZE.value], check=True,
                       capture_output=True)  # fmt: skip
        disk = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(hf), str(Path(tmp) / "orbax"), _DTYPE.value],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        stats = json.loads(out.stdout.split("STATS", 1)[1])
    extra = stats["peak_rss_mib"] - stats["rss_before_mib"] - stats["params_mib"]
    print(f"size={_SIZE.value} shards on disk {disk:.0f} MiB -> {_DTYPE.value}")
    print(f"{stats['tensors']} tensors in {stats['seconds']:.1f}s")
    print(f"RSS before {stats['rss_before_mib']:.0f} MiB, params {stats['params_mib']:.0f} MiB, "
          f"largest tensor {stats['largest_tensor']} "
          f"{stats['largest_tensor_mib']:.0f} MiB")  # fmt: skip
    print(f"peak RSS {stats['peak_rss_mib']:.0f} MiB -> overhead beyond params {extra:.0f} MiB "
          f"({extra / stats['largest_tensor_mib']:.2f} x largest tensor)")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
