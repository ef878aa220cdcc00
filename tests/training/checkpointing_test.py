"""Checkpointer: train state + Grain iterator state together, retention, corrupt-step fallback."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimia_jax.training.checkpointing import Checkpointer, CorruptCheckpoint


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
