"""Atomic, umask-honouring writes (kimia_jax.fileio) and their users (write_wav)."""

import os
import stat

import numpy as np
import pytest

from kimia_jax import fileio
from kimia_jax.detokenizer import write_wav


@pytest.fixture
def umask():
    """Sets a umask for one test and restores the previous one."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_folders_get_the_umask_modes(tmp_path, umask, mask):
    umask(mask)
    f = fileio.write_text(tmp_path / "a.txt", "hello")
    assert f.read_text() == "hello" and _mode(f) == 0o666 & ~mask
    with fileio.atomic_dir(tmp_path / "ckpt") as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "x.bin").write_bytes(b"1")
    assert _mode(tmp_path / "ckpt") == 0o777 & ~mask
    assert _mode(tmp_path / "ckpt" / "sub") == 0o777 & ~mask
    assert _mode(tmp_path / "ckpt" / "sub" / "x.bin") == 0o666 & ~mask
    w = write_wav(tmp_path / "out.wav", np.zeros(240, np.float32))
    assert _mode(w) == 0o666 & ~mask  # tempfile alone would give 0600


def test_failed_writes_leave_the_old_content_and_no_staging(tmp_path):
    target = tmp_path / "r.jsonl"
    fileio.write_text(target, "old")
    with pytest.raises(RuntimeError), fileio.atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError), fileio.atomic_dir(tmp_path / "d") as stage:
        (stage / "x").write_bytes(b"1")
        raise RuntimeError("killed")
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_atomic_dir_refuses_or_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "ckpt"
    with fileio.atomic_dir(out) as stage:
        (stage / "v1").write_text("1")
    with (
        pytest.raises(FileExistsError, match=r"ckpt already exists; pass overwrite=True"),
        fileio.atomic_dir(out),
    ):
        pass
    with fileio.atomic_dir(out, overwrite=True) as stage:
        (stage / "v2").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_staging_of_a_killed_write_is_found_sized_and_removed(tmp_path):
    out = tmp_path / "kimia-orbax"
    # What a kill -9 during `atomic_dir(out)` leaves behind: the staging folder, full of data.
    stage = tmp_path / (fileio.staging_name(out) + "abc123")
    (stage / "llm").mkdir(parents=True)
    (stage / "llm" / "shard").write_bytes(b"x" * 5000)
    (tmp_path / "kimia-orbax-other").mkdir()  # a different output: not ours to touch
    found = fileio.stale_staging(out)
    assert found == [(stage, 5000)]
    assert fileio.human_bytes(5000) == "4.9 KiB"
    assert fileio.remove_stale_staging(out) == [(stage, 5000)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kimia-orbax-other"]
