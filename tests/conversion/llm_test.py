"""HF folder -> params: verified mapping, sharded/bf16 sources, Orbax round trip, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimia_jax import checkpoint
from kimia_jax.conversion import common
from kimia_jax.conversion import llm as conv
from kimia_jax.conversion.common import CheckpointError
from tests.llm_helpers import LLM_DIR


@pytest.fixture(scope="module")
def reference_params():
    return conv.load(LLM_DIR)[1]


def _copy_with(tmp_path, mutate=None, config_mutate=None):
    """A copy of the tiny checkpoint folder with tensors/config edited."""
    d = tmp_path / "ckpt"
    d.mkdir()
    tensors = load_file(str(LLM_DIR / "model.safetensors"))
    if mutate:
        mutate(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((LLM_DIR / "config.json").read_text())
    if config_mutate:
        config_mutate(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _assert_same(a, b):
    fa, fb = common.flatten(a), common.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_every_tensor_is_mapped_once(reference_params):
    names = common.SafetensorsSource(LLM_DIR).names()
    flat = common.flatten(reference_params)
    assert len(names) == len(flat) == 71  # 5 layers x 12 + 5 singles + 6 adaptor tensors


def test_sharded_folder_equals_single_file(reference_params):
    _, sharded = conv.load(LLM_DIR / "sharded")
    _assert_same(sharded, reference_params)


def test_bf16_shards_read_without_torch(tmp_path, reference_params):
    d = _copy_with(
        tmp_path, mutate=lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    )
    _, p32 = conv.load(d, dtype="float32")
    want = jax.tree.map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), reference_params
    )
    _assert_same(p32, want)
    _, p16 = conv.load(d, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


def test_released_inv_freq_buffers_are_ignored(tmp_path, reference_params):
    d = _copy_with(tmp_path, mutate=lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))  # fmt: skip
    _assert_same(conv.load(d)[1], reference_params)


def test_orbax_round_trip_is_atomic_and_exact(tmp_path, reference_params):
    out = tmp_path / "orbax"
    stats = conv.convert_to_orbax(LLM_DIR, out, dtype="float32", progress=False)
    assert stats["tensors"] == 71
    assert checkpoint.is_orbax_dir(out)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no leftovers
    _assert_same(conv.load(out)[1], reference_params)
    with pytest.raises(FileExistsError):
        conv.convert_to_orbax(LLM_DIR, out, dtype="float32", progress=False)


def test_failed_conversion_leaves_nothing(tmp_path):
    d = _copy_with(tmp_path, mutate=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError):
        conv.convert_to_orbax(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_tensor_is_named(tmp_path):
    d = _copy_with(tmp_path, mutate=lambda t: t.pop("model.mimo_layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"no tensor in the checkpoint: mimo_layers_1/mlp/up_proj/weight"
    ):
        conv.load(d)


def test_unused_tensor_is_named(tmp_path):
    d = _copy_with(
        tmp_path, mutate=lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)})
    )
    with pytest.raises(CheckpointError, match=r"not used by the model: model\.extra\.weight"):
        conv.load(d)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    def cut(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][
            :, :-1
        ]

    d = _copy_with(tmp_path, mutate=cut)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(8, 39\)"
        r".*expects \(8, 40\)",
    ):
        conv.load(d)


def test_nan_tensor_is_rejected(tmp_path):
    def poison(t):
        t["model.norm.weight"] = t["model.norm.weight"].copy()
        t["model.norm.weight"][3] = np.nan

    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' contains NaN"):
        conv.load(_copy_with(tmp_path, mutate=poison))


def test_config_missing_key_is_named(tmp_path):
    d = _copy_with(tmp_path, config_mutate=lambda c: c.pop("kimia_mimo_layers"))
    with pytest.raises(
        CheckpointError, match=r"missing required config key\(s\) \['kimia_mimo_layers'\]"
    ):
        conv.load(d)


def test_missing_shard_and_folder_errors(tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(LLM_DIR / "sharded", d)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match="shard files named in model.safetensors.index.json are missing"
    ):
        conv.load(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        conv.load(tmp_path / "nope")


def test_corrupt_safetensors_file(tmp_path):
    d = _copy_with(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        conv.load(d)
