"""kimia_jax.checkpoint and the four loaders on both layouts.

* `save` is atomic: a failed save leaves nothing behind, an overwrite swaps the whole directory.
* Restores go straight onto their shards on a (data=2, fsdp=2, tensor=2) mesh of the 8 simulated
  devices, equal to the single-device load (exact: same bytes).
* The LLM, whisper-large-v3, GLM-4-Voice VQ and detokenizer loaders give the same errors on the
  released folder and on our converted Orbax directory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from kimia_jax import checkpoint, sharding
from kimia_jax.configs import layout
from kimia_jax.conversion import detokenizer as detok_conv
from kimia_jax.conversion import llm as llm_conv
from kimia_jax.conversion import whisper as whisper_conv
from kimia_jax.errors import CheckpointError, CheckpointNotFoundError
from tests.detokenizer_helpers import MODEL_DIR as DETOK_ROOT
from tests.llm_helpers import LLM_DIR

AUDIO = Path(__file__).parents[1] / "fixtures" / "audio"


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Atomic save


def test_save_restore_round_trip_and_overwrite(tmp_path):
    params = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3), jnp.bfloat16)}}
    out = checkpoint.save(tmp_path / "ck", params, files={"config.json": "{}"}, meta={"x": 1})
    assert checkpoint.is_orbax_dir(out) and (out / "config.json").read_text() == "{}"
    meta = checkpoint.read_meta(out)
    assert {k: meta[k] for k in ("format_version", "x")} == {
        "format_version": checkpoint.FORMAT_VERSION,
        "x": 1,
    }
    # the file table `verify` checks: every file with its size
    assert "params/_METADATA" in meta["files"] and "config.json" not in meta["files"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            params)  # fmt: skip
    _leaves_equal(checkpoint.restore(out, abstract), params)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        checkpoint.save(tmp_path / "ck", params)
    newer = jax.tree.map(lambda x: x + 1, params)
    checkpoint.save(tmp_path / "ck", newer, overwrite=True)
    _leaves_equal(checkpoint.restore(out, abstract), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old dirs left


def test_failed_save_leaves_nothing(tmp_path):
    good = {"a": jnp.arange(3.0)}
    checkpoint.save(tmp_path / "ck", good)
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises for a non-array leaf
        checkpoint.save(tmp_path / "ck", {"a": object()}, overwrite=True)
    with pytest.raises(Exception):  # noqa: B017
        checkpoint.save(tmp_path / "new", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the old one survives intact
    abstract = {"a": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=good["a"].sharding)}
    _leaves_equal(checkpoint.restore(tmp_path / "ck", abstract), good)


def test_restore_mismatch_names_the_directory_and_parameters(tmp_path):
    checkpoint.save(tmp_path / "ck", {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}})
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=dev)

    params = re.escape(f"{tmp_path / 'ck' / 'params'}: the saved parameters do not fit the config")
    with pytest.raises(CheckpointError, match=params + ": missing: x; not in the model: a$"):
        checkpoint.restore(tmp_path / "ck", {"x": sds(3), "b": {"c": sds(2, 2)}})
    with pytest.raises(
        CheckpointError, match=params + re.escape(": shapes: b/c (2, 2) (the config gives (2, 3))")
    ):
        checkpoint.restore(tmp_path / "ck", {"a": sds(3), "b": {"c": sds(2, 3)}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        checkpoint.DamagedCheckpointError,
        match=re.escape(f"{tmp_path / 'empty'}: params/ is missing") + ".*--overwrite",
    ):
        checkpoint.restore(tmp_path / "empty", {"a": sds(3)})


# ---------------------------------------------------------------------------------------------
# Sharded restore


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each released tiny part converted once to our Orbax layout."""
    root = tmp_path_factory.mktemp("converted")
    llm_conv.convert_to_orbax(LLM_DIR, root / "llm", dtype="float32", progress=False)
    whisper_conv.convert_folder(AUDIO / layout.WHISPER_DIR, root / "whisper")
    whisper_conv.convert_folder(AUDIO / layout.GLM_TOKENIZER_DIR, root / "glm")
    detok_conv.convert_released(DETOK_ROOT, root / "detokenizer")
    return root


def test_sharded_restore_on_8_devices(converted):
    mesh = sharding.parse_mesh("data=2,fsdp=2,tensor=2")
    for load, path, ref in (
        (llm_conv.load, converted / "llm", LLM_DIR),
        (whisper_conv.load, converted / "whisper", AUDIO / layout.WHISPER_DIR),
        (detok_conv.load, converted / "detokenizer", DETOK_ROOT),
    ):
        cfg1, single = load(ref)
        cfg8, sharded = load(path, mesh=mesh)
        assert cfg1 == cfg8
        _leaves_equal(single, sharded)
        leaves = jax.tree.leaves(sharded)
        assert all(x.sharding.mesh == mesh for x in leaves)
        split = [x for x in leaves if x.sharding.shard_shape(x.shape) != x.shape]
        assert split, f"{path}: no parameter is split over the mesh"


# ---------------------------------------------------------------------------------------------
# Same errors on both layouts


def _edit_yaml_hidden(path: Path) -> None:
    d = yaml.safe_load(path.read_text())
    d["model"]["dit"]["hidden_size"] = 32
    path.write_text(yaml.safe_dump(d))


def _edit_json(key, value):
    def edit(path: Path) -> None:
        d = json.loads(path.read_text())
        d[key] = value
        path.write_text(json.dumps(d))

    return edit


FAMILIES = {
    # name: (loader, released folder, files to copy, config file in released / converted, edit)
    "llm": (llm_conv.load, LLM_DIR, ["config.json", "model.safetensors"],
            "config.json", "config.json", _edit_json("intermediate_size", 96), "LLM"),
    "whisper": (lambda p, **kw: whisper_conv.load(p, kind="whisper", **kw),
                AUDIO / layout.WHISPER_DIR, None, "config.json", "config.json",
                _edit_json("encoder_ffn_dim", 80), "audio encoder"),
    "glm": (lambda p, **kw: whisper_conv.load(p, kind="vq", **kw),
            AUDIO / layout.GLM_TOKENIZER_DIR, None, "config.json", "config.json",
            _edit_json("encoder_ffn_dim", 88), "audio encoder"),
    "detokenizer": (detok_conv.load, DETOK_ROOT, None,
                    f"{layout.DIT_DIR}/{layout.DIT_CONFIG}", layout.DIT_CONFIG,
                    _edit_yaml_hidden, "detokenizer"),
}  # fmt: skip


def _copy_released(name, dst: Path) -> Path:
    _, src, files, *_ = FAMILIES[name]
    if files is None:
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)
        for f in files:
            shutil.copy(src / f, dst / f)
    return dst


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_errors_for_both_layouts(name, converted, tmp_path):
    load, _, _, cfg_released, cfg_converted, edit, what = FAMILIES[name]
    released = _copy_released(name, tmp_path / "released")
    conv_dir = tmp_path / "converted"
    shutil.copytree(converted / name, conv_dir)
    # both load
    _, p_rel = load(released)
    _, p_conv = load(conv_dir)
    _leaves_equal(p_rel, p_conv)

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=f"neither a converted {what}"):
        load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load(tmp_path / "empty")

    # a config that does not fit the weights: a CheckpointError naming the file or directory
    for root, cfg_file, named in (
        (released, cfg_released, r"tensor '.*' has shape"),
        (
            conv_dir,
            cfg_converted,
            re.escape(f"{conv_dir / 'params'}: the saved parameters do not")
            + r" fit the config: shapes: \S+ \(",
        ),
    ):
        original = (root / cfg_file).read_text()
        edit(root / cfg_file)
        with pytest.raises(CheckpointError, match=named):
            load(root)
        (root / cfg_file).unlink()
        with pytest.raises(CheckpointError, match=re.escape(f"{root / cfg_file} is missing")):
            load(root)
        (root / cfg_file).write_text(original)


def test_wrong_encoder_kind_is_named():
    with pytest.raises(CheckpointError, match="expected a GLM-4-Voice VQ tokenizer"):
        whisper_conv.load(AUDIO / layout.WHISPER_DIR, kind="vq")
    with pytest.raises(CheckpointError, match="expected a whisper encoder"):
        whisper_conv.load(AUDIO / layout.GLM_TOKENIZER_DIR, kind="whisper")


def test_converted_model_root_finds_its_detokenizer(converted, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(converted / "detokenizer", root / layout.DETOKENIZER_DIR)
    cfg, params = detok_conv.load(root, dtype="bfloat16")
    assert cfg.dit.dtype == cfg.vocoder.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
