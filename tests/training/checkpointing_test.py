"""Checkpointer: train state + Grain iterator state together, retention, corrupt-step fallback."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.checkpoint import file_crc32
from kimia_jax.training.checkpointing import MANIFEST, Checkpointer, CorruptCheckpoint


def _iter():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


def _state(step: int) -> dict:
    k = jax.random.key_data(jax.random.key(step))
    return {
        "step": jnp.asarray(step, jnp.int32),
        "params": {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3.0) * step},
        "opt_state": (jnp.zeros(()), {"mu": jnp.ones((4, 3)) * step}),
        "rng": k,
    }


def _abstract(meta):
    del meta
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _run(ckpt: Checkpointer, steps: int) -> list[int]:
    it = _iter()
    seen = []
    for step in range(1, steps + 1):
        seen.append(int(next(it)))
        if ckpt.should_save(step):
            ckpt.save(step, _state(step), it, {"whisper_trainable": False, "name": "t"})
    ckpt.wait()
    return seen


def test_save_restore_state_and_iterator(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=2, keep_last=2, keep_every=4)
    seen = _run(ckpt, 10)
    # keep-last 2 (8, 10) + keep-every 4 (4, 8); 2 and 6 deleted
    assert ckpt.steps() == [4, 8, 10]
    it = _iter()
    state, meta = ckpt.restore_latest(_abstract, it)
    assert meta == {"whisper_trainable": False, "name": "t", "step": 10}
    jax.tree.map(np.testing.assert_array_equal, state, _state(10))
    # the iterator continues after the 10 elements the saved step had consumed
    ref = _iter()
    want = [int(next(ref)) for _ in range(13)]
    assert seen == want[:10]
    assert [int(next(it)) for _ in range(3)] == want[10:]
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, damage):
    ckpt = Checkpointer(tmp_path, save_every=3, keep_last=3)
    _run(ckpt, 9)
    assert ckpt.steps() == [3, 6, 9]
    files = sorted(
        p for p in (tmp_path / "9" / "state").rglob("*") if p.is_file() and p.stat().st_size > 8
    )
    for p in files:
        if damage == "truncate":
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
        else:
            p.unlink()
    with pytest.raises(CorruptCheckpoint):
        ckpt.check(9)
    ckpt2 = Checkpointer(tmp_path, save_every=3, keep_last=3)
    it = _iter()
    state, meta = ckpt2.restore_latest(_abstract, it)
    assert meta["step"] == 6
    jax.tree.map(np.testing.assert_array_equal, state, _state(6))
    err = capsys.readouterr().err
    assert "checkpoint step 9" in err and "corrupt" in err
    ckpt2.close()
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1)
    assert ckpt.restore_latest(_abstract, _iter()) is None
    ckpt.close()


def test_same_size_corruption_is_caught_by_the_crc(tmp_path, capsys):
    """Bytes overwritten in place (the file keeps its size, so a size check passes and the
    restore itself may read garbage): the manifest's CRC-32 names the file, the run restores the
    previous step."""
    ckpt = Checkpointer(tmp_path, save_every=3, keep_last=3)
    _run(ckpt, 6)
    manifest = json.loads((tmp_path / "6" / MANIFEST).read_text())
    rel, (size, crc) = max(manifest.items(), key=lambda kv: kv[1][0])  # the biggest file
    assert crc == file_crc32(tmp_path / "6" / rel)
    p = tmp_path / "6" / rel
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    p.write_bytes(bytes(data))
    assert p.stat().st_size == size
    with pytest.raises(CorruptCheckpoint, match=f"{rel} is corrupted .*CRC-32"):
        ckpt.check(6)
    ckpt2 = Checkpointer(tmp_path, save_every=3, keep_last=3)
    state, meta = ckpt2.restore_latest(_abstract, _iter())
    assert meta["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    err = capsys.readouterr().err
    assert "checkpoint step 6" in err and "CRC-32" in err
    # sizes-only checking (checksums=False) does not see it: the CRC is what catches it
    Checkpointer(tmp_path, save_every=3, checksums=False).check(6)
    ckpt2.close()
    ckpt.close()
