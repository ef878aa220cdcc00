"""Conversion of the released torch files: Orbax round trip, named errors, memory, wav writer."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from kimia_jax.conversion.common import CheckpointError, flatten

pytestmark = pytest.mark.torch


def _copy_released(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def _edit_state_dict(path: Path, entry: str, fn) -> None:
    import torch

    ckpt = torch.load(path, weights_only=True)
    fn(ckpt[entry])
    torch.save(ckpt, path)


def test_orbax_round_trip_equals_released_load(tmp_path, model_dir, detok):
    from kimia_jax.conversion.detokenizer import convert_released
    from kimia_jax.detokenizer import Detokenizer

    out = convert_released(model_dir, tmp_path / "detok")
    assert (out / "config.yaml").is_file() and (out / "vocoder_config.json").is_file()
    again = Detokenizer.from_pretrained(out)
    a, b = flatten(detok.params), flatten(jax.device_get(again.params))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert again.mel_norm == detok.mel_norm and again.dit_cfg == detok.dit_cfg
    with pytest.raises(FileExistsError):
        convert_released(model_dir, out)


def test_weight_norm_is_folded(model_dir, detok):
    import torch

    sd = torch.load(model_dir / "vocoder" / "model.pt", weights_only=True)["generator"]
    v, g = (
        sd["ups.0.0.weight_v"].double(),
        sd["ups.0.0.weight_g"].double(),
    )  # ConvTranspose: per input channel
    w = (g * v / v.norm(dim=(1, 2), keepdim=True)).float().numpy()
    np.testing.assert_allclose(
        np.asarray(detok.params["vocoder"]["ups_0"]["kernel"]),
        np.transpose(w, (2, 0, 1)),
        atol=1e-7,
    )
    v, g = (
        sd["conv_pre.weight_v"].double(),
        sd["conv_pre.weight_g"].double(),
    )  # Conv1d: per output channel
    w = (g * v / v.norm(dim=(1, 2), keepdim=True)).float().numpy()
    np.testing.assert_allclose(
        np.asarray(detok.params["vocoder"]["conv_pre"]["kernel"]),
        np.transpose(w, (2, 1, 0)),
        atol=1e-7,
    )


def test_mismatched_dit_tensor_is_named_with_both_shapes(tmp_path, model_dir):
    import torch

    from kimia_jax.detokenizer import Detokenizer

    root = _copy_released(model_dir, tmp_path / "m")
    pt = root / "audio_detokenizer" / "model.pt"
    _edit_state_dict(
        pt,
        "state_dict",
        lambda sd: sd.__setitem__("speech_model.blocks.1.attn.proj.weight", torch.zeros(64, 63)),
    )
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'blocks\.1\.attn\.proj\.weight' has shape \(64, 63\) "
        r".*the model expects \(64, 64\)",
    ):
        Detokenizer.from_pretrained(root)


def test_missing_and_unexpected_tensors(tmp_path, model_dir):
    import torch

    from kimia_jax.detokenizer import Detokenizer

    root = _copy_released(model_dir, tmp_path / "m")
    pt = root / "audio_detokenizer" / "model.pt"
    _edit_state_dict(pt, "state_dict", lambda sd: sd.pop("speech_model.final_layer.linear.bias"))
    with pytest.raises(
        CheckpointError, match=r"no tensor in the checkpoint: final_layer/linear/bias"
    ):
        Detokenizer.from_pretrained(root)
    _copy_released(model_dir, tmp_path / "n")
    pt = tmp_path / "n" / "audio_detokenizer" / "model.pt"
    _edit_state_dict(
        pt,
        "state_dict",
        lambda sd: sd.__setitem__("speech_model.blocks.9.attn.qkv.weight", torch.zeros(3)),
    )
    with pytest.raises(
        CheckpointError, match=r"not used by the model: blocks\.9\.attn\.qkv\.weight"
    ):
        Detokenizer.from_pretrained(tmp_path / "n")
    vp = tmp_path / "n" / "vocoder" / "model.pt"
    shutil.copy(model_dir / "vocoder" / "model.pt", vp)
    _edit_state_dict(vp, "generator", lambda sd: sd.pop("conv_post.weight_g"))
    from kimia_jax.conversion.detokenizer import (
        TorchStateDictSource,
        convert_vocoder,
        read_vocoder_config,
    )

    with pytest.raises(
        CheckpointError, match=r"'conv_post\.weight_v' has no matching 'conv_post\.weight_g'"
    ):
        convert_vocoder(
            TorchStateDictSource(vp, "generator"),
            read_vocoder_config(model_dir / "vocoder" / "config.json"),
        )


def test_bad_config_and_missing_files(tmp_path, model_dir):
    from kimia_jax.detokenizer import Detokenizer

    root = _copy_released(model_dir, tmp_path / "m")
    y = root / "audio_detokenizer" / "config.yaml"
    y.write_text(y.read_text().replace("ffn_type: vanilla_mlp", "ffn_type: conv1d_conv1d"))
    with pytest.raises(CheckpointError, match="ffn_type 'conv1d_conv1d' is not supported"):
        Detokenizer.from_pretrained(root)
    y.write_text(y.read_text().replace("ffn_type: conv1d_conv1d", "ffn_type: vanilla_mlp"))
    cfg = json.loads((model_dir / "vocoder" / "config.json").read_text())
    cfg["upsample_rates"] = [24, 10]
    (root / "vocoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocoder hop 240 != detokenizer frame_size 480"):
        Detokenizer.from_pretrained(root)
    (root / "vocoder" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"vocoder/model\.pt is missing"):
        Detokenizer.from_pretrained(root)
    with pytest.raises(FileNotFoundError, match="neither a converted detokenizer"):
        Detokenizer.from_pretrained(tmp_path)


def test_training_checkpoint_optimizer_state_is_never_read(tmp_path, model_dir):
    """A Lightning checkpoint whose optimizer state dwarfs the weights: RSS stays near the weights.

    The optimizer moments (2 x 192 MiB here, like the released 2/3 of 19 GB) live in the same
    file; mmap=True + weights_only=True means they are never paged in. Measured in a fresh
    process: the RSS growth of loading stays far below the file size.
    """
    import torch

    root = _copy_released(model_dir, tmp_path / "m")
    pt = root / "audio_detokenizer" / "model.pt"
    ckpt = torch.load(pt, weights_only=True)
    big = 48 * 1024 * 1024  # floats: 192 MiB per moment
    ckpt["optimizer_states"] = [
        {"state": {0: {"exp_avg": torch.randn(big), "exp_avg_sq": torch.randn(big)}}}
    ]
    ckpt["state_dict"]["resampler.kernel"] = torch.randn(
        16
    )  # non-DiT key, ignored like the official loader
    torch.save(ckpt, pt)
    del ckpt
    load_hook = os.environ.get("KIMIA_TEST_LOAD_HOOK", "")  # control run: force a non-mmap load
    code = textwrap.dedent(f"""
        import json, psutil
        from kimia_jax.conversion import detokenizer as conv
        import torch, jax  # noqa: imported before the baseline so only loading is measured
        {load_hook}
        base = psutil.Process().memory_info().rss / 2**20  # current RSS, not the import peak
        cfg, params = conv.load({str(root)!r})
        # VmHWM is this process's own high-water mark; ru_maxrss would include the parent's RSS at
        # fork (Linux keeps the larger one across exec).
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        peak = int(hwm.split()[1]) / 1024
        print(json.dumps({{"base": base, "peak": peak}}))
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    grow = r["peak"] - r["base"]
    print(
        f"peak RSS {r['peak']:.0f} MiB, growth while loading {grow:.0f} MiB, "
        f"file {pt.stat().st_size / 2**20:.0f} MiB"
    )
    assert grow < 150, f"loading grew RSS by {grow:.0f} MiB: the optimizer state was read"


def test_write_wav_is_atomic_and_round_trips(tmp_path):
    import soundfile as sf

    from kimia_jax.detokenizer import write_wav

    wav = (0.5 * np.sin(np.arange(2400) / 10)).astype(np.float32)
    p = write_wav(tmp_path / "out" / "a.wav", wav)
    back, sr = sf.read(p, dtype="float32")
    assert sr == 24000 and back.shape == wav.shape and np.abs(back - wav).max() < 1e-4
    assert [q.name for q in (tmp_path / "out").iterdir()] == ["a.wav"]  # no temp file left behind
    with pytest.raises(ValueError, match="NaN or inf"):
        write_wav(tmp_path / "out" / "b.wav", np.array([0.0, np.nan], np.float32))
    assert not (tmp_path / "out" / "b.wav").exists()
    assert [q.name for q in (tmp_path / "out").iterdir()] == ["a.wav"]
