"""The exported released layout against PyTorch: the LLM safetensors loaded into a transformers
Qwen2 + MIMO reference (`tools/torch_kimia.py`, itself checked against the official
fixture here) give our trained model's text and audio logits, and the exported
`whisper-large-v3/` loads in transformers' `WhisperModel` with our encoder's output.

"Trained" params: every tensor of the tiny model moved by random noise (as a training step moves
every tensor), so a tensor exported under the wrong name, un-transposed or left at its source value
cannot pass (compared with the unmoved source weights instead, the errors are 0.13 / 0.17 / 1.05:
checked once by hand). Measured (fp32,
2-core EPYC): torch reference vs official fixture logits 4.3e-7 (text) / 3.7e-7 (audio) relative to
max |logit|; exported LLM in torch vs our in-memory params: text 3.8e-7, audio 6.2e-7; exported
encoder: the tiny random Whisper is ill-conditioned in fp32 (transformers fp32 vs its own fp64:
5.0e-5), so both are judged against transformers in fp64: ours 2.6e-5 (bound: 3x transformers'
fp32 error).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _inputs(cfg, t: int = 40, seed: int = 0):
    """Random two-stream ids, positions and whisper features at 10 continuous positions."""
    rng = np.random.default_rng(seed)
    off = cfg.kimia_token_offset
    audio = rng.integers(off, cfg.vocab_size, (2, t)).astype(np.int32)
    text = rng.integers(1, off, (2, t)).astype(np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy()
    cont = np.zeros((2, t), bool)
    cont[:, 5:15] = True
    feats = np.where(
        cont[..., None],
        rng.standard_normal((2, t, cfg.kimia_adaptor_input_dim)).astype(np.float32),
        0.0,
    ).astype(np.float32)
    return audio, text, pos, feats, cont


def assert_matches_torch(folder, params, *, tol: float = 1e-5) -> dict[str, float]:
    """Logits of `folder`'s exported LLM in the torch reference vs ours with `params["llm"]`, and
    its whisper-large-v3/ in transformers vs ours with `params["whisper"]`; returns the errors."""
    import transformers

    from kimia_jax.conversion import llm as llm_conv
    from kimia_jax.conversion import whisper as whisper_conv
    from kimia_jax.models.kimia_llm import KimiaLLM
    from kimia_jax.models.whisper_encoder import WhisperEncoder
    from tools.torch_kimia import TorchKimia

    lcfg, _ = llm_conv.load(folder, dtype="float32")
    audio, text, pos, feats, cont = _inputs(lcfg)
    ours = KimiaLLM(lcfg).apply({"params": params["llm"]}, audio, text, pos, feats, cont)
    ref = TorchKimia.from_released(folder)
    with torch.no_grad():
        t, a = ref(*(torch.as_tensor(x) for x in (audio, text, pos, feats, cont)))
    errs = {"text": _rel(ours.text_logits, t.numpy()), "audio": _rel(ours.audio_logits, a.numpy())}
    wdir = folder / "whisper-large-v3"
    wcfg, _ = whisper_conv.load(wdir, dtype="float32")
    hf = transformers.WhisperModel.from_pretrained(wdir).float().eval()
    mel = np.random.default_rng(1).standard_normal((1, wcfg.num_mel_bins, 3000)).astype(np.float32)
    with torch.no_grad():
        want32 = hf.get_encoder()(torch.from_numpy(mel)).last_hidden_state.numpy()
        hf = hf.double()
        want = hf.get_encoder()(torch.from_numpy(mel).double()).last_hidden_state.numpy()
    got = WhisperEncoder(wcfg).apply({"params": params["whisper"]}, mel)
    # The tiny random encoder is ill-conditioned in fp32 (transformers' own fp32 output is ~6e-6
    # from its fp64 one): both fp32 encoders are judged against transformers in fp64.
    errs["whisper"] = _rel(got, want)
    errs["whisper_torch_fp32"] = _rel(want32, want)
    print("exported vs torch, relative errors:", errs)
    assert errs["text"] <= tol and errs["audio"] <= tol, errs
    assert errs["whisper"] <= max(3 * errs["whisper_torch_fp32"], tol), errs
    return errs


def test_torch_reference_matches_official_fixture(fixtures_dir):
    """The reference itself: the official MoonshotKimia prefill logits of fixtures/llm."""
    from tools.torch_kimia import TorchKimia

    z = np.load(fixtures_dir / "llm" / "fixture.npz")
    mask = z["is_continuous_mask"]
    feats = np.zeros((*mask.shape, z["whisper_feature"].shape[-1]), np.float32)
    feats[mask] = z["whisper_feature"][0]
    ref = TorchKimia.from_released(fixtures_dir / "llm")
    ids = (z["audio_input_ids"], z["text_input_ids"], z["position_ids"], feats, mask)
    with torch.no_grad():
        t, a = ref(*(torch.as_tensor(x) for x in ids))
    assert _rel(t.numpy(), z["prefill_text_logits"]) < 1e-5  # measured 4.3e-7
    assert _rel(a.numpy(), z["prefill_audio_logits"]) < 1e-5  # measured 3.7e-7


def test_exported_released_layout_matches_torch(tmp_path):
    from kimia_jax.conversion import llm as llm_conv
    from kimia_jax.conversion import whisper as whisper_conv
    from kimia_jax.testing import tiny_kimia
    from kimia_jax.training import export

    src = tiny_kimia.write(tmp_path / "src", seed=0, dtype="float32", detokenizer=False)
    _, lp = llm_conv.load(src, dtype="float32")
    _, wp = whisper_conv.load(src / "whisper-large-v3", dtype="float32")
    rng = np.random.default_rng(0)

    def moved(x):
        x = np.asarray(x)
        return x + (0.05 * (np.abs(x).mean() + 1e-2) * rng.standard_normal(x.shape)).astype(x.dtype)

    params = {"llm": jax.tree.map(moved, lp), "whisper": jax.tree.map(moved, wp)}
    out = export.export_released(src, tmp_path / "released", params)
    assert_matches_torch(out, params)
    # every exported tensor holds its trained value, not the source's (the reference loads all
    # of them, strictly: a tensor without a parameter or the reverse is an error)
    from safetensors.numpy import load_file

    for folder in (Path(""), Path("whisper-large-v3")):
        for f in sorted((src / folder).glob("*.safetensors")):
            before, after = load_file(str(f)), load_file(str(out / folder / f.name))
            assert before.keys() == after.keys()
            moved = [n for n in before if not np.array_equal(before[n], after[n])]
            assert len(moved) == len(before), sorted(set(before) - set(moved))[:5]
