"""Peak memory and time of loading an int8 LLM: quantize on load vs a folder converted with
--quantize=int8, in one run (each load in its own fresh process).

    python -m tools.measure_qload --size=0.5b     # random Qwen2.5-0.5B-shaped Kimi LLM, bf16
    python -m tools.measure_qload --paper         # the 7B's converted folder bytes only

Writes a random released-layout LLM folder (`testing.tiny_llm.write` at `sized_config(size)`:
bf16 sharded safetensors + index, as tools/measure_conversion.py), converts it to Orbax twice
(bf16, and --quantize=int8: peak RSS and time of each conversion), then loads, each in a new
process (`llm.load(dtype="bfloat16")`):
  float            the bf16 Orbax folder, no quantization (reference)
  float+quantize   the bf16 Orbax folder with quantize="int8": the whole float model restored,
                   then quantized matrix by matrix (KimiAudio(converted folder, quantize="int8"))
  released+quantize  the released folder with quantize="int8": quantized tensor by tensor as read
  int8 folder      the --quantize=int8 folder: int8 + scales restored directly
and prints for each: seconds, host peak RSS above the RSS before loading (ru_maxrss), and device
bytes (sum of `jax.live_arrays()` nbytes) at their peak (sampled every 5 ms by a thread) and at
the end. On CPU the device buffers are host memory, so RSS includes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

_SIZE = flags.DEFINE_enum("size", "0.5b", ["tiny", "0.5b"], "Model shape.")
_PAPER = flags.DEFINE_bool("paper", False, "Only print the 7B's folder bytes on paper.")

_CONVERT = """
import json, sys
from kimia_jax.conversion import llm
q = None if sys.argv[3] == "none" else sys.argv[3]
stats = llm.convert_to_orbax(sys.argv[1], sys.argv[2], progress=False, quantize=q)
print("STATS" + json.dumps(stats))
"""

_WRITER = """
import sys
from kimia_jax.testing import tiny_llm
tiny_llm.write(sys.argv[1], config=tiny_llm.sized_config(sys.argv[2]), dtype="bfloat16",
               num_shards=4)
"""

_LOAD = """
import json, resource, sys, threading, time
import jax
from kimia_jax.conversion import common, llm
from kimia_jax.layers import quant

def live():
    return sum(a.nbytes for a in jax.live_arrays())

jax.devices()
rss0 = common.current_rss_mib()
peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], live())
        time.sleep(0.005)
t = threading.Thread(target=sample)
t.start()
t0 = time.perf_counter()
q = None if sys.argv[2] == "none" else sys.argv[2]
cfg, params = llm.load(sys.argv[1], dtype="bfloat16", quantize=q)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
done.set(); t.join()
end = live()
print("STATS" + json.dumps(dict(
    seconds=seconds, rss_before_mib=rss0, peak_rss_mib=common.peak_rss_mib(),
    live_peak_mib=max(peak[0], end) / 2**20, live_end_mib=end / 2**20,
    params_mib=quant.nbytes(params) / 2**20, kind=quant.kind_of(params))))
"""


def _run(code: str, *args: str) -> dict:
    # A fresh interpreter per measurement, started from this small parent (which never imports
    # jax): Linux carries ru_maxrss across fork+exec, so a large parent would taint the peaks.
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("STATS", 1)[1])


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def paper_7b() -> dict[str, float]:
    """GB of the 7B LLM's tensors in a converted folder, uncompressed (Orbax compresses a little
    more): bf16, and --quantize int8 / int4 (the `quant.DECODE` matrices quantized + fp32
    scales, the rest bf16), from the abstract tree (`quant.abstract`): nothing is allocated."""
    import flax.linen as nn

    from kimia_jax import configs
    from kimia_jax.layers import quant
    from kimia_jax.models import kimia_llm

    cfg = configs.kimia_7b(dtype="bfloat16", param_dtype="bfloat16")
    shapes = nn.unbox(kimia_llm.abstract_params(cfg))
    out = {"bf16": quant.nbytes(shapes) / 1e9}
    for kind in quant.KINDS:
        out[kind] = quant.nbytes(quant.abstract(shapes, kind, modules=quant.DECODE)) / 1e9
    return out


def main(argv):
    del argv
    if _PAPER.value:
        p = paper_7b()
        print(f"Kimi-Audio-7B LLM, tensor bytes of the converted folder: bf16 {p['bf16']:.1f} "
              f"GB, --quantize=int8 {p['int8']:.1f} GB, "
              f"--quantize=int4 {p['int4']:.1f} GB")  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, fl, q8 = tmp / "hf", tmp / "bf16", tmp / "int8"
        subprocess.run([sys.executable, "-c", _WRITER, str(hf), _SIZE.value], check=True,
                       capture_output=True)  # fmt: skip
        conv = {"bf16": _run(_CONVERT, hf, fl, "none"), "int8": _run(_CONVERT, hf, q8, "int8")}
        disk = {"released": sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20,
                "bf16": folder_mib(fl), "int8": folder_mib(q8)}  # fmt: skip
        loads = {
            "float": _run(_LOAD, fl, "none"),
            "float+quantize": _run(_LOAD, fl, "int8"),
            "released+quantize": _run(_LOAD, hf, "int8"),
            "int8 folder": _run(_LOAD, q8, "none"),
        }
    print(f"size={_SIZE.value}; folders on disk: released bf16 {disk['released']:.0f} MiB, "
          f"Orbax bf16 {disk['bf16']:.0f} MiB, Orbax int8 {disk['int8']:.0f} MiB")  # fmt: skip
    for k, s in conv.items():
        print(f"convert -> {k:5s}: {s['seconds']:6.1f} s, peak RSS {s['peak_rss_mib']:6.0f} MiB "
              f"(before {s['rss_before_mib']:.0f}), params {s['params_mib']:.0f} MiB")  # fmt: skip
    print(f"{'load':18s} {'seconds':>8s} {'RSS peak-before':>16s} {'live peak':>10s} "
          f"{'live end':>9s} {'params':>8s}  (MiB)")  # fmt: skip
    for k, s in loads.items():
        print(f"{k:18s} {s['seconds']:8.2f} {s['peak_rss_mib'] - s['rss_before_mib']:16.0f} "
              f"{s['live_peak_mib']:10.0f} {s['live_end_mib']:9.0f} {s['params_mib']:8.0f}  "
              f"{s['kind'] or 'float'}")  # fmt: skip
    print(json.dumps({"convert": conv, "disk_mib": disk, "load": loads}))


if __name__ == "__main__":
    app.run(main)
