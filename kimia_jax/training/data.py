"""Grain input pipelines: records -> examples -> packed rows -> mixed, per-process batches
(training.md §2.1-§2.5, §3.8).

Shape of a pipeline (one per task, each with its own seed and builder)::

    MapDataset.source(records)[slot::num_slots] -> shuffle(seed) -> repeat -> to_iter_dataset
      -> map(builder: record -> Example; dropped examples filtered)  -> PackedRows (first fit)

then `IterDataset.mix(task pipelines, weights)` (token weights: packing happens before mixing, so
each task keeps its own packer and iterator state, and the mixture can change on resume), and
`batches`: every row of the GLOBAL batch is its own "slot" pipeline reading the slice
`[slot::num_slots]` of every source; a process builds only its slots
`[process_index * rows_per_process, ...)` and stacks them. The global batch is therefore the same
on any number of processes that divides it (1 x 8 devices == 2 x 4 devices, same seeds -> same
batches), and no process reads another's records.

Records (§2.1): ArrayRecord files of msgpack maps (`write_records` / `ArrayRecordSource`, waveforms
of `audio-*` shards by `AudioShards`), the same records as a TFDS dataset (`TfdsSource`), or the
official SFT jsonl (`JsonlSource`, audio paths resolved against the file's folder). Builders come
from `kimia_jax.training.examples` (`sft_builder` / `pretrain_builder` adapt them to records).

Packing (`PackedRows`): first-fit over a buffer of `buffer_size` examples with the packer of
`examples.pack` (positions, Whisper windows and segments per row), rows built with
`examples.row_arrays` (segment ids, restarting positions, `whisper_wav` windows, `cont_src`).
Its iterator state is (parent state at the buffer's start, rows already emitted), so a restore
rebuilds the same buffer and continues exactly; nothing is skipped or repeated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from flax import serialization

from kimia_jax import fileio
from kimia_jax.errors import PromptError
from kimia_jax.training.examples import (
    Example,
    ExampleDropped,
    PretrainExampleBuilder,
    Segment,
    SftExampleBuilder,
    pack,
    row_arrays,
    stack_rows,
)

# ----------------------------------------------------------------------------------------------
# record files


def encode_record(record: Mapping[str, Any]) -> bytes:
    """A flat map of numpy arrays / strings / numbers -> msgpack bytes (training.md §2.1)."""
    return serialization.msgpack_serialize(dict(record))


def decode_record(data: bytes) -> dict[str, Any]:
    return dict(serialization.msgpack_restore(data))


def write_records(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> str:
    """Writes one ArrayRecord file of msgpack records (random access: group_size 1).

    Atomic: the records go to a staging name next to `path` (`fileio.staging_name`), which is
    renamed over `path` once the writer is closed; an interrupted write leaves no `path`."""
    import tempfile

    from array_record.python.array_record_module import ArrayRecordWriter

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=fileio.staging_name(final), dir=final.parent)
    os.close(fd)
    try:
        w = ArrayRecordWriter(tmp, "group_size:1")
        try:
            for r in records:
                w.write(encode_record(r))
        finally:
            w.close()
        os.chmod(tmp, 0o666 & ~fileio.current_umask())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(final)


class AudioShards:
    """Waveforms of the `audio-XXXXX-of-YYYYY.array_record` family (training.md §2.3), fetched by
    the `(audio shard, record index)` refs of `pt_docs` records (`audio_ref_orig` rows): mono 16 kHz
    16-bit FLAC -> float32 (int16 / 32768, what the official loader gives for such a file).

    `AudioShards(folder)` (or a glob); usable as `pretrain_builder(..., audio=AudioShards(out))`.
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str]) -> None:
        import glob
        import re

        if isinstance(paths, (str, os.PathLike)):
            p = Path(paths)
            pattern = str(p / "audio-*.array_record") if p.is_dir() else str(p)
            paths = sorted(glob.glob(pattern))
            if not paths:
                raise FileNotFoundError(f"AudioShards: no audio shard matches {pattern!r}")
        self._paths: dict[int, str] = {}
        for q in paths:
            m = re.search(r"audio-(\d+)-of-\d+\.array_record$", str(q))
            if not m:
                raise ValueError(f"AudioShards: {q} is not named audio-XXXXX-of-YYYYY.array_record")
            self._paths[int(m.group(1))] = str(q)
        self._open: dict[int, Any] = {}

    def record(self, shard: int, index: int) -> dict[str, Any]:
        if shard not in self._paths:
            raise KeyError(f"AudioShards: no audio shard {shard} (have {sorted(self._paths)})")
        if shard not in self._open:
            self._open[shard] = grain.sources.ArrayRecordDataSource([self._paths[shard]])
        return decode_record(self._open[shard][int(index)])

    def __call__(self, ref: Any) -> np.ndarray:
        import io

        import soundfile as sf

        shard, index = (int(x) for x in np.asarray(ref).reshape(-1)[:2])
        rec = self.record(shard, index)
        wav, _ = sf.read(io.BytesIO(rec["flac_16k"]), dtype="float32")
        return wav


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """Decoded records of ArrayRecord files (a glob or a list of paths), in file order."""

    def __init__(self, paths: str | Sequence[str]) -> None:
        if isinstance(paths, str):
            import glob

            found = sorted(glob.glob(paths))
            if not found:
                raise FileNotFoundError(f"ArrayRecordSource: no file matches {paths!r}")
            paths = found
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"ArrayRecordSource: {p} does not exist")
        self.paths = list(paths)
        self._src = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return decode_record(self._src[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # explicit: the underlying source ends with ValueError, not the IndexError `for` expects
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.paths})"


class TfdsSource(grain.sources.RandomAccessDataSource):
    """Records of a TFDS dataset in ArrayRecord format (`as_data_source`; no TensorFlow), as the
    dicts `ArrayRecordSource` gives, in TFDS's order (its writer shuffles by key hash): TFDS `Text`
    features (bytes) become `str`, sequences of them `list[str]`; a dataset whose examples carry
    one msgpack `record` (the `sft` config of `data.tfds_builder.KimiaPrepared`) is decoded to
    that record.

    `TfdsSource("kimia_prepared/pt_docs", data_dir=..., split="train")`: the dataset is found in
    `data_dir` from its files (the builder class need not be imported).
    """

    BYTES_FIELDS = ("flac_16k", "record")

    def __init__(self, name: str, *, data_dir: str | os.PathLike[str] | None = None,
                 split: str = "train") -> None:  # fmt: skip
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
            self._src = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises several types for a missing / unbuilt dataset
            raise FileNotFoundError(
                f"TfdsSource: no TFDS dataset {name!r} split {split!r} in data_dir={data_dir} "
                f"({type(e).__name__}: {str(e).splitlines()[0]}); build it with "
                "data.tfds_builder.KimiaPrepared"
            ) from e
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self._src[i]
        if set(ex) == {"row_id", "task", "record"}:
            return decode_record(ex["record"])
        out: dict[str, Any] = {}
        for k, v in ex.items():
            if isinstance(v, bytes) and k not in self.BYTES_FIELDS:
                v = v.decode("utf-8")
            elif isinstance(v, list) or (isinstance(v, np.ndarray) and v.dtype == object):
                v = [x.decode("utf-8") if isinstance(x, bytes) else x for x in list(v)]
            out[k] = v
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r})"


class JsonlSource(grain.sources.RandomAccessDataSource):
    """Lines of an official SFT jsonl file; each record carries `_base_dir` (the file's folder,
    against which relative audio paths are resolved)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"JsonlSource: {self.path} does not exist")
        self._lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            rec = json.loads(self._lines[i])
        except json.JSONDecodeError as e:
            raise PromptError(f"{self.path}: record {i}: invalid JSON ({e})") from e
        rec["_base_dir"] = str(self.path.parent)
        return rec

    def __repr__(self) -> str:
        return f"JsonlSource({self.path})"


# ----------------------------------------------------------------------------------------------
# record -> Example adapters


def sft_builder(builder: SftExampleBuilder) -> Callable[[Mapping[str, Any]], Example]:
    """Official jsonl lines (`task_type`, `conversation`) or our records (`messages`)."""

    def build(rec: Mapping[str, Any]) -> Example:
        if "conversation" in rec:
            return builder.official(rec, rec.get("_base_dir"))
        return builder.record(rec)

    return build


def pretrain_builder(
    builder: PretrainExampleBuilder, task: str, audio: Callable[[Any], np.ndarray] | None = None
) -> Callable[[Mapping[str, Any]], Example]:
    """A `pt_docs` record (§2.2: ragged `codes_orig_flat`/`codes_len`, `text_ids_flat`/
    `text_ids_len`, `seg_has_text`) or a `text` record (`text_ids`) -> the `task` layout.
    `audio(ref)` fetches a waveform by `audio_ref_orig` row; records may instead carry
    `audio_flat` / `num_samples_16k` (float32 samples inline, for small sets)."""

    def build(rec: Mapping[str, Any]) -> Example:
        if task == "text_only":
            return builder.text_only(np.asarray(rec["text_ids"]).tolist())
        codes = np.split(np.asarray(rec["codes_orig_flat"]), np.cumsum(rec["codes_len"])[:-1])
        texts = np.split(np.asarray(rec["text_ids_flat"]), np.cumsum(rec["text_ids_len"])[:-1])
        has_text = np.asarray(rec.get("seg_has_text", np.ones(len(codes), bool)))
        if "audio_flat" in rec:
            ns = np.asarray(rec["num_samples_16k"])
            wavs = np.split(np.asarray(rec["audio_flat"], np.float32), np.cumsum(ns)[:-1])
        elif audio is not None:
            refs = np.asarray(rec["audio_ref_orig"])
            wavs = [audio(r) for r in refs]
        else:
            wavs = [None] * len(codes)
        segs = [
            Segment(c.astype(np.int64), t if h else None, w)
            for c, t, h, w in zip(codes, texts, has_text, wavs, strict=True)
        ]
        return builder.build(task, segs)

    return build


# ----------------------------------------------------------------------------------------------
# packing


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Static shape of the packed rows: positions T, Whisper windows W, examples per row."""

    length: int
    max_windows: int
    pad_id: int
    max_segments: int = 8
    wav_dtype: str = "float32"


class PackedRows(grain.IterDataset):
    """First-fit packing of an `Example` stream into §2.4 rows (+ `task_id`, `num_examples`).

    Examples are read `buffer_size` at a time and packed first-fit (`examples.pack`); rows are
    emitted in order of creation. Rows are only as good as the buffer is large: the efficiency
    (`PackingStats`) grows with it.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        spec: RowSpec,
        *,
        buffer_size: int = 64,
        task_id: int = 0,
        stats: PackingStats | None = None,
    ) -> None:
        super().__init__(parent)
        self.spec, self.buffer_size, self.task_id = spec, int(buffer_size), int(task_id)
        self.stats = stats

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackedRows(T={self.spec.length}, W={self.spec.max_windows})"


@dataclasses.dataclass
class PackingStats:
    """Positions used / offered by the emitted rows (packing efficiency)."""

    rows: int = 0
    examples: int = 0
    used: int = 0
    total: int = 0

    @property
    def efficiency(self) -> float:
        return self.used / max(self.total, 1)


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: PackedRows) -> None:
        super().__init__(parent)
        self._ds = ds
        self._start = parent.get_state()
        self._buf: list[Example] = []
        self._rows: list[list[int]] = []
        self._emitted = 0
        self._skip = 0

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        self._buf = []
        for _ in range(self._ds.buffer_size):
            try:
                self._buf.append(next(self._parent))
            except StopIteration:
                break
        if not self._buf:
            raise StopIteration
        s = self._ds.spec
        self._rows = pack(self._buf, s.length, s.max_windows, s.max_segments)
        self._emitted = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while self._emitted >= len(self._rows):
            self._fill()
            self._emitted, self._skip = self._skip, 0
        s = self._ds.spec
        exs = [self._buf[i] for i in self._rows[self._emitted]]
        self._emitted += 1
        row = row_arrays(exs, s.length, s.max_windows, s.pad_id, wav_dtype=np.dtype(s.wav_dtype))
        row["task_id"] = np.int32(self._ds.task_id)
        row["num_examples"] = np.int32(len(exs))
        if self._ds.stats is not None:
            st = self._ds.stats
            st.rows += 1
            st.examples += len(exs)
            st.used += sum(len(e) for e in exs)
            st.total += s.length
        return row

    def get_state(self) -> dict[str, Any]:
        if self._emitted >= len(self._rows):  # buffer used up: resume from the parent's state
            return {"parent": self._parent.get_state(), "emitted": 0}
        return {"parent": self._start, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buf, self._rows, self._emitted = [], [], 0
        self._skip = int(state["emitted"])


# ----------------------------------------------------------------------------------------------
# tasks, mixture, batches


@dataclasses.dataclass(frozen=True)
class Task:
    """One pipeline of the mixture: its records, record -> Example builder, weight and seed."""

    name: str
    source: Any  # RandomAccessDataSource or Sequence of records
    build: Callable[[Mapping[str, Any]], Example]
    weight: float = 1.0
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever


def _build_or_none(build: Callable[[Mapping[str, Any]], Example], name: str) -> Callable:
    def f(rec: Mapping[str, Any]) -> Example | None:
        try:
            ex = build(rec)
        except ExampleDropped:
            return None
        return dataclasses.replace(ex, task=ex.task or name)

    return f


def task_rows(
    task: Task,
    task_id: int,
    spec: RowSpec,
    *,
    slot: int = 0,
    num_slots: int = 1,
    buffer_size: int = 64,
    stats: PackingStats | None = None,
    read: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Packed rows of one task for one batch slot (records `[slot::num_slots]`).

    Records are read and built by `read` threads (default: 1 thread, `buffer_size` ahead: many
    slot pipelines share a host's cores; raise it when the builders load audio from disk)."""
    n = len(task.source)
    if n < num_slots:
        raise ValueError(
            f"task {task.name!r} has {n} records, fewer than the {num_slots} rows of the global "
            "batch (each row reads its own slice): lower the batch or add records"
        )
    ds = grain.MapDataset.source(task.source)[slot::num_slots]
    ds = ds.shuffle(seed=task.seed).repeat(task.num_epochs)
    ds = ds.map(_build_or_none(task.build, task.name))  # None (dropped) is skipped below
    it = ds.to_iter_dataset(
        read or grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer_size)
    )
    return PackedRows(it, spec, buffer_size=buffer_size, task_id=task_id, stats=stats)


def mixture(tasks: Sequence[Task], spec: RowSpec, **kw: Any) -> grain.IterDataset:
    """Rows of several tasks mixed by weight (IterDataset level, training.md §3.8)."""
    if not tasks:
        raise ValueError("mixture: no tasks")
    parts = [task_rows(t, i, spec, **kw) for i, t in enumerate(tasks)]
    if len(parts) == 1:
        return parts[0]
    return grain.IterDataset.mix(parts, [t.weight for t in tasks])


def process_slots(global_rows: int, process_index: int, process_count: int) -> range:
    if global_rows % process_count:
        raise ValueError(
            f"global batch of {global_rows} rows does not divide over {process_count} processes"
        )
    k = global_rows // process_count
    return range(process_index * k, (process_index + 1) * k)


def batches(
    tasks: Sequence[Task],
    spec: RowSpec,
    global_rows: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    buffer_size: int = 64,
    prefetch_workers: int = 0,
    stats: PackingStats | None = None,
    read: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """This process's [global_rows / process_count, ...] batches of the global batch.

    Global row r comes from slot pipeline r (its own record slice of every task), so the global
    batch does not depend on the process count. `prefetch_workers > 0` runs the pipeline in
    that many worker processes (`mp_prefetch`); iterator state stays checkpointable.
    """
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    slots = [
        mixture(
            tasks,
            spec,
            slot=s,
            num_slots=global_rows,
            buffer_size=buffer_size,
            stats=stats,
            read=read,
        )
        for s in process_slots(global_rows, pi, pc)
    ]
    ds = grain.experimental.ZipIterDataset(slots) if len(slots) > 1 else slots[0]
    ds = ds.map(lambda rows: stack_rows(rows if isinstance(rows, tuple) else (rows,)))
    if prefetch_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=prefetch_workers))
    return ds


# ----------------------------------------------------------------------------------------------
# iterator state


def state_to_json(it: grain.DatasetIterator) -> str:
    return json.dumps(it.get_state(), default=_jsonable, sort_keys=True)


def state_from_json(it: grain.DatasetIterator, text: str) -> None:
    it.set_state(json.loads(text))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"iterator state holds a {type(x).__name__}, not JSON")
