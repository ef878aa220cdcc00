"""Quantized LLM folders (`convert_to_orbax(quantize=)`, `--quantize`): written atomically, loaded
as int8 / int4 directly, bit-identical to quantizing the float model on load, a mismatched
`quantize=` named. Token agreement through the loop: tests/inference/quant_test.py and
tests/inference/end_to_end_test.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax import checkpoint, sharding
from kimia_jax.conversion import common
from kimia_jax.conversion import llm as conv
from kimia_jax.errors import QuantizeMismatchError
from kimia_jax.layers import quant
from kimia_jax.models import kimia_llm
from tests.llm_helpers import LLM_DIR


@pytest.fixture(scope="module")
def float_params():
    return conv.load(LLM_DIR)[1]


def _flat(tree):
    return common.flatten(
        jax.tree.map(lambda x: x, tree, is_leaf=lambda x: isinstance(x, quant.QWeight))
    )


def _assert_identical(a, b):
    """Same tree (QWeights in the same places), dtypes and bits."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert type(fa[k]) is type(fb[k]), k
        for x, y in zip(jax.tree.leaves(fa[k]), jax.tree.leaves(fb[k]), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, k
            np.testing.assert_array_equal(
                np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)), err_msg=k
            )


@pytest.fixture(scope="module", params=["int8", "int4"])
def folder(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "llm"
    conv.convert_to_orbax(LLM_DIR, out, dtype="float32", progress=False, quantize=request.param)
    return request.param, out


def test_folder_loads_quantized_and_equals_quantize_on_load(folder, float_params):
    """The restored tree is the quantize-on-load tree bit for bit (q, scales, float leaves),
    from the Orbax folder and from the released folder quantized tensor by tensor as read."""
    kind, out = folder
    meta = checkpoint.read_meta(out)
    assert meta["quantize"] == kind and meta["quantized_modules"] == list(quant.DECODE)
    want = quant.quantize(float_params, kind, modules=quant.DECODE)
    _, got = conv.load(out)
    assert quant.kind_of(got) == kind
    _assert_identical(got, want)
    _assert_identical(conv.load(LLM_DIR, quantize=kind)[1], want)
    _assert_identical(conv.load(out, quantize=kind)[1], want)

    # on disk: the quantized bytes, not the float ones (int8 q + scales; int4 stored a byte per
    # value by TensorStore: Orbax has no packed int4). Compared with the float folder written the
    # same way: at this tiny size OCDBT's packing moves the total by ~100 kB between runs
    # (226-340 kB for the same int8 tree), so a bound on array bytes alone was flaky.
    def disk(root):
        return sum(
            p.stat().st_size for p in (root / checkpoint.PARAMS_DIR).rglob("*") if p.is_file()
        )

    float_out = out.parent / "float"
    if not float_out.exists():
        conv.convert_to_orbax(LLM_DIR, float_out, dtype="float32", progress=False)
    assert disk(out) < 0.6 * disk(float_out), (disk(out), disk(float_out))
    assert f"--quantize {kind}" in checkpoint.converter_command(out)


def test_mismatched_quantize_is_named(folder):
    kind, out = folder
    other = "int4" if kind == "int8" else "int8"
    for bad, want in ((other, f"{other} weights"), ("none", "float weights")):
        with pytest.raises(QuantizeMismatchError, match=f"holds {kind} LLM weights") as e:
            conv.load(out, quantize=bad)
        assert want in str(e.value) and f"quantize={bad!r}" in str(e.value)
        assert str(out) in str(e.value)
    assert conv.resolve_quantize(out, None) == conv.resolve_quantize(out, kind) == kind
    assert conv.resolve_quantize(LLM_DIR, None) is None
    assert conv.resolve_quantize(LLM_DIR, "none") is None
    assert conv.resolve_quantize(LLM_DIR, kind) == kind
    with pytest.raises(ValueError, match="quantize must be None, 'none' or one of"):
        conv.resolve_quantize(out, "int2")


def test_quantized_folder_on_a_mesh_and_stacked(folder):
    """Restored straight onto a (fsdp 2, tensor 2) mesh: q placed as its float weight, scales
    with the input axis unsplit; then stacked for scan_layers (`to_layout`) on the mesh."""
    kind, out = folder
    _, ref = conv.load(out)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    cfg, got = conv.load(out, mesh=mesh)
    _assert_identical(got, ref)
    up = got["layers_0"]["mlp"]["up_proj"]["weight"]  # [mlp, embed] -> ("tensor", "fsdp")
    assert tuple(up.q.sharding.spec) == ("tensor", "fsdp")
    assert tuple(up.scale.sharding.spec) == ("tensor", None)
    stacked = kimia_llm.to_layout(got, dataclasses.replace(cfg, scan_layers=True), mesh)
    sq = stacked["layers"]["mlp"]["up_proj"]["weight"]
    assert isinstance(sq, quant.QWeight) and sq.q.shape[0] == cfg.num_hidden_layers
    assert tuple(sq.scale.sharding.spec)[-1] is None
    np.testing.assert_array_equal(np.asarray(sq.q[0]).astype(np.int8), np.asarray(up.q, np.int8))


def test_interrupted_quantized_conversion_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the quantized params were written into the staging folder (while the
    file table is made) leaves neither the folder nor the staging folder."""
    written = []

    def failing(root):
        written.extend(p.name for p in (root / checkpoint.PARAMS_DIR).iterdir())
        raise RuntimeError("interrupted")

    monkeypatch.setattr(checkpoint, "file_table", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        conv.convert_to_orbax(LLM_DIR, tmp_path / "out", progress=False, quantize="int8")
    assert written and list(tmp_path.iterdir()) == []
