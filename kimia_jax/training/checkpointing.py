"""Train-state checkpoints that survive preemption (training.md §5.6).

`Checkpointer` wraps an Orbax `CheckpointManager` with three items per step:

* `state`: {step, params, opt_state, rng} (`StandardSave`, restored straight onto the shardings of
  an abstract state),
* `data`: the Grain iterator state of every process (`grain.checkpoint.CheckpointHandler`, one
  JSON file per process; the state is snapshotted when `save` is called, so an async save writes
  the position of the batches the saved params have seen, not a later one),
* `meta`: {step, whisper_trainable (the freeze phase, which fixes the optimizer-state structure),
  manifest-free metadata such as the config name}.

Saves are async (`save` returns once the arrays are copied off the devices), every
`save_every` steps; the `keep_last` newest steps plus every `keep_every`-th step are kept
(Orbax `max_to_keep` / `keep_period`). Orbax writes a
step into a temporary folder and renames it when complete, so a killed save never looks complete.
After a step is finalized a `MANIFEST.json` (relative path -> [size, CRC-32] of every file, the
scheme of `kimia_jax.checkpoint`'s converted folders) is written; `restore_latest` checks the
newest step against it (a missing, truncated or same-size overwritten file; and a failed restore:
an unreadable file), reports a corrupt step on stderr/logging and falls back to the previous one.
The CRC pass reads every byte once (zlib, ~1 GB/s per core): a minute or two for a 7B train state
with its AdamW moments, at save (process 0) and at restore; `checksums=False` checks sizes only.

`PreemptionGuard` turns SIGTERM into a flag the loop checks after each step (the loop then saves
and exits); with several processes the flag is agreed across all of them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from kimia_jax.checkpoint import file_crc32

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"


class _Snapshot:
    """An iterator state frozen at save time, for grain's CheckpointHandler (bytes path)."""

    def __init__(self, it: Any) -> None:
        self._state = json.dumps(it.get_state(), indent=1, default=_jsonable)

    def get_state(self) -> bytes:
        return self._state.encode()


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"iterator state holds a {type(x).__name__}, not JSON")


class CorruptCheckpoint(RuntimeError):
    """A finalized checkpoint whose files do not match its manifest or do not restore."""


class Checkpointer:
    """Orbax CheckpointManager for the train state + the Grain iterator state.

    Args:
      directory: the run's checkpoint folder (created).
      save_every: steps between periodic saves (`should_save`).
      keep_last: newest checkpoints kept; keep_every: steps divisible by it are kept forever
        (None: none).
      async_save: write in a background thread.
      checksums: record and check each file's CRC-32 (else sizes only).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        checksums: bool = True,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.checksums = bool(checksums)
        self.save_every = int(save_every)
        opts = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides (periodic + forced saves)
            max_to_keep=keep_last,
            keep_period=keep_every,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=opts,
        )

    # -- save ------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: dict[str, Any], iterator: Any, meta: dict[str, Any]) -> None:
        """Starts saving `state` (a pytree of arrays), `iterator`'s state and `meta` at `step`."""
        self._write_manifests()
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_Snapshot(iterator)),
                meta=ocp.args.JsonSave(dict(meta, step=int(step))),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until pending saves are on disk (and manifested)."""
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _write_manifests(self) -> None:
        if jax.process_index() != 0:
            return
        # all_steps() lists finalized steps only; the newest may still be in flight
        pending = self.manager.is_saving_in_progress()
        steps = sorted(self.manager.all_steps())
        if pending and steps:
            steps = steps[:-1]
        for step in steps:
            d = self.directory / str(step)
            m = d / MANIFEST
            if d.is_dir() and not m.exists():
                table = {
                    str(p.relative_to(d)): [
                        p.stat().st_size,
                        file_crc32(p) if self.checksums else None,
                    ]
                    for p in sorted(d.rglob("*"))
                    if p.is_file()
                }
                tmp = d / (MANIFEST + ".tmp")
                tmp.write_text(json.dumps(table, indent=1))
                os.replace(tmp, m)

    # -- restore ---------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def check(self, step: int) -> None:
        """Raises CorruptCheckpoint if `step`'s files differ from its manifest (missing, other
        size, other CRC-32). A step without a manifest (its save was still in flight when the run
        ended) is left to the restore itself, which fails on a missing or truncated file."""
        d = self.directory / str(step)
        m = d / MANIFEST
        if not m.exists():
            return
        try:
            want = json.loads(m.read_text())
        except ValueError as e:
            raise CorruptCheckpoint(f"checkpoint step {step}: {MANIFEST} is not JSON ({e})") from e
        for rel, entry in want.items():
            size, crc = entry if isinstance(entry, list) else (entry, None)  # old: size only
            p = d / rel
            if not p.is_file():
                raise CorruptCheckpoint(f"checkpoint step {step}: {rel} is missing")
            if p.stat().st_size != size:
                raise CorruptCheckpoint(
                    f"checkpoint step {step}: {rel} has {p.stat().st_size} bytes, the manifest "
                    f"says {size} (truncated or overwritten)"
                )
            if self.checksums and crc is not None and file_crc32(p) != crc:
                raise CorruptCheckpoint(
                    f"checkpoint step {step}: {rel} is corrupted (same size, but its CRC-32 "
                    f"differs from the one written at save time)"
                )

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(
        self, step: int, abstract: Callable[[dict[str, Any]], Any], iterator: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Restores step `step`: `abstract(meta)` gives the state's ShapeDtypeStructs (with
        shardings) for that meta (the freeze phase fixes the optimizer structure); `iterator`'s
        state is set in place. Returns (state, meta)."""
        self.check(step)
        meta = self.read_meta(step)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(meta)),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        return out["state"], meta

    def restore_latest(
        self, abstract: Callable[[dict[str, Any]], Any], iterator: Any
    ) -> tuple[Any, dict[str, Any]] | None:
        """Newest complete, readable checkpoint (None if there is none); corrupt ones are
        reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract, iterator)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                msg = (
                    f"checkpoint step {step} in {self.directory} is corrupt or incomplete "
                    f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous one"
                )
                log.error(msg)
                print(msg, file=sys.stderr, flush=True)
        return None


class PreemptionGuard:
    """SIGTERM -> `requested` (agreed across processes): the loop saves and exits cleanly."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self._flag = False
        self._old: dict[int, Any] = {}
        self._signals = signals

    def __enter__(self) -> PreemptionGuard:
        for s in self._signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        print(f"signal {signum}: saving a checkpoint and exiting", file=sys.stderr, flush=True)
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
        return bool(np.any(flags))
