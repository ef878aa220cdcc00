"""The training loop: data -> `TrainStep` -> metrics, checkpoints, preemption (training.md §5.5,
§5.6).

`Trainer.run` resumes from the newest complete checkpoint of `<workdir>/checkpoints` (train state
+ Grain iterator state + freeze phase), so the same command restarted after a kill continues the
same batch sequence and reproduces the uninterrupted run's losses and params bit for bit. Every
process feeds its own rows (`data.batches` for its process index); the global batch is assembled
with `jax.make_array_from_process_local_data`.

Per step it records (TensorBoard + `metrics.jsonl` + progress line): loss, text / audio stream
losses, loss per task (per-example losses grouped by the row's `task_id`; each process sums its
own rows, the sums and counts are added over all processes), learning rate, gradient
norm, tokens/s (non-padding positions), MFU (6 N tokens / time / peak FLOP/s, when the peak is
given), data wait time (seconds blocked in `next(iterator)`) and its fraction of the step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kimia_jax.training.checkpointing import Checkpointer, PreemptionGuard
from kimia_jax.training.lora import LoraTrainStep
from kimia_jax.training.metrics import MetricWriter, Progress
from kimia_jax.training.train_step import BATCH_AXES, TrainState, TrainStep, batch_shardings


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Attributes:
    total_steps: optimizer steps of the run.
    unfreeze_whisper_at: step at which the Whisper encoder starts training (training.md §5.5:
      round(0.2 * total_steps)); 0: trainable from the start; None: frozen throughout.
    save_every, keep_last, keep_every, async_save: checkpoints (`Checkpointer`).
    log_every: metrics / progress interval; seed: the RNG saved with the state.
    peak_flops: per-device peak FLOP/s for MFU (None: MFU not reported).
    stop_at: stop (after saving) at this step, as a preemption would (tests, staged runs).
    """

    total_steps: int
    unfreeze_whisper_at: int | None = 0
    save_every: int = 100
    keep_last: int = 3
    keep_every: int | None = None
    async_save: bool = True
    log_every: int = 1
    seed: int = 0
    peak_flops: float | None = None
    stop_at: int | None = None


def _host_rng(seed: int) -> np.ndarray:
    """The run's PRNG key data as a host array (saved by the primary process in any topology;
    a single-device jax.Array cannot be saved from several processes)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def _num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Trainer:
    """Runs `step` over `dataset` (this process's batches) from `params` in `workdir`.

    Args:
      step: the compiled train step (its mesh spans all processes' devices): a `TrainStep`, or a
        `lora.LoraTrainStep` (params {"llm": adapted, "whisper"}; checkpoints hold the adapters
        and their optimizer state only, the frozen base is rebuilt from `params` on restore).
      params: initial {"llm", "whisper"} params (used when no checkpoint exists).
      dataset: a Grain IterDataset of this process's batches (`data.batches`).
      workdir: run folder (checkpoints/, tensorboard/, metrics.jsonl).
      loop: LoopConfig; task_names: names of the data tasks (task_id order) for per-task losses.
    """

    def __init__(
        self,
        step: TrainStep | LoraTrainStep,
        params: Any,
        dataset: Any,
        workdir: str | Path,
        loop: LoopConfig,
        task_names: Sequence[str] = (),
    ) -> None:
        self.step, self.params, self.dataset, self.loop = step, params, dataset, loop
        self.workdir = Path(workdir)
        self.task_names = list(task_names)
        self.ckpt = Checkpointer(
            self.workdir / "checkpoints",
            save_every=loop.save_every,
            keep_last=loop.keep_last,
            keep_every=loop.keep_every,
            async_save=loop.async_save,
        )

    # -- state <-> checkpoint ------------------------------------------------------------------

    def _trainable_at(self, step: int) -> bool:
        u = self.loop.unfreeze_whisper_at
        return u is not None and step >= u

    def _fresh(self, trainable: bool) -> TrainState:
        return self.step.init(self.params, whisper_trainable=trainable)

    def _to_tree(self, state: TrainState, rng: jax.Array) -> dict[str, Any]:
        return {
            "step": state.step,
            "params": self.step.checkpointed_params(state.params),
            "opt_state": state.opt_state,
            "rng": rng,
        }

    def _abstract(self, meta: dict[str, Any]) -> Any:
        fresh = self._fresh(bool(meta["whisper_trainable"]))
        tree = self._to_tree(fresh, _host_rng(0))
        return jax.tree.map(
            lambda x: (
                x
                if isinstance(x, np.ndarray)
                else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            ),
            tree,
        )

    def _save(self, step: int, state: TrainState, rng: jax.Array, it: Any) -> None:
        self.ckpt.save(
            step,
            self._to_tree(state, rng),
            it,
            {"whisper_trainable": bool(state.whisper_trainable)},
        )

    # -- batches ---------------------------------------------------------------------------------

    def _global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        batch = {k: v for k, v in batch.items() if k in BATCH_AXES}
        mesh = self.step.mesh
        if mesh is None:
            return batch
        pc = jax.process_count()
        shapes = {
            k: jax.ShapeDtypeStruct((v.shape[0] * pc, *v.shape[1:]), v.dtype)
            for k, v in batch.items()
        }
        shard = batch_shardings(shapes, mesh)
        return {
            k: jax.make_array_from_process_local_data(shard[k], v, shapes[k].shape)
            for k, v in batch.items()
        }

    def _task_losses(self, metrics: dict[str, Any], batch: dict[str, np.ndarray]) -> dict:
        """Loss per task and head over the GLOBAL batch: this process's (sum, count) of the
        per-example losses of its own rows, summed over all processes, then divided."""
        if "task_id" not in batch or not self.task_names:
            return {}
        rows = self._local_rows(batch)
        per = {h: rows_of(metrics[f"segment_loss_{h}"], rows) for h in HEADS}
        sums, counts = task_loss_sums(per, batch, len(self.task_names))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            both = multihost_utils.process_allgather(np.stack([sums, counts]))  # [P, 2, H, N]
            sums, counts = both.sum(axis=0)
        return task_loss_means(sums, counts, self.task_names)

    def _local_rows(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Global row indices of this process's batch rows, in the order of its local rows
        (`make_array_from_process_local_data` lays local rows out over the process's shards in
        global-index order)."""
        n = len(batch["segment_ids"])
        if self.step.mesh is None or jax.process_count() == 1:
            return np.arange(n)
        gshape = (n * jax.process_count(), *np.shape(batch["segment_ids"])[1:])
        shape = {"segment_ids": jax.ShapeDtypeStruct(gshape, np.int32)}
        sh = batch_shardings(shape, self.step.mesh)["segment_ids"]
        rows = set()
        for idx in sh.addressable_devices_indices_map(gshape).values():
            rows.update(range(*idx[0].indices(gshape[0])))
        out = np.array(sorted(rows))
        if len(out) != n:
            raise RuntimeError(f"process {jax.process_index()} owns {len(out)} rows, fed {n}")
        return out

    # -- loop ------------------------------------------------------------------------------------

    def run(self) -> tuple[TrainState, dict[str, float]]:
        loop = self.loop
        it = iter(self.dataset)
        restored = self.ckpt.restore_latest(self._abstract, it)
        if restored is None:
            state = self._fresh(self._trainable_at(0))
            rng = _host_rng(loop.seed)
            start = 0
        else:
            tree, meta = restored
            state = TrainState(
                step=tree["step"],
                params=self.step.restore_params(tree["params"], self.params),
                opt_state=tree["opt_state"],
                whisper_trainable=bool(meta["whisper_trainable"]),
            )
            rng = np.asarray(tree["rng"])
            start = int(meta["step"])
            print(f"resumed from checkpoint step {start} in {self.ckpt.directory}", flush=True)
        writer = MetricWriter(self.workdir)
        progress = Progress(loop.total_steps, start, every=loop.log_every)
        n_params = _num_params(state.params)
        last: dict[str, float] = {}
        step = start
        with PreemptionGuard() as guard:
            while step < loop.total_steps:
                if not state.whisper_trainable and self._trainable_at(step):
                    state = self.step.unfreeze_whisper(state)
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                state, metrics = self.step(state, self._global_batch(batch))
                step += 1
                loss = float(metrics["loss"])  # waits for the step
                t2 = time.perf_counter()
                tokens = int(np.sum(np.asarray(batch["segment_ids"]) > 0)) * jax.process_count()
                dt = t2 - t0
                last = {
                    "loss": loss,
                    "loss_text": float(metrics["loss_text"]),
                    "loss_audio": float(metrics["loss_audio"]),
                    "learning_rate": float(metrics["lr"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens / dt,
                    "step_time_s": dt,
                    "data_wait_s": t1 - t0,
                    "data_wait_fraction": (t1 - t0) / dt,
                    "whisper_trainable": float(state.whisper_trainable),
                    **self._task_losses(metrics, batch),
                }
                if loop.peak_flops:
                    flops = 6.0 * n_params * tokens
                    last["mfu"] = flops / dt / (loop.peak_flops * jax.device_count())
                if step % loop.log_every == 0 or step == loop.total_steps:
                    writer.write(step, last)
                progress.update(
                    step, loss, f" | {tokens / dt:.0f} tok/s | data {100 * (t1 - t0) / dt:.0f}%"
                )
                stop = loop.stop_at is not None and step >= loop.stop_at
                preempted = guard.requested()
                if self.ckpt.should_save(step) or step == loop.total_steps or stop or preempted:
                    self._save(step, state, rng, it)
                if stop or preempted:
                    print(f"stopping at step {step} (checkpoint saved)", flush=True)
                    break
        self.ckpt.close()
        writer.close()
        return state, last


HEADS = ("text", "audio")


def rows_of(x: Any, rows: np.ndarray) -> np.ndarray:
    """Global rows `rows` of `x` [B_global, ...], read from this process's addressable shards
    (whatever x's sharding: split over the batch, or replicated)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)[rows]
    out: list[Any] = [None] * len(rows)
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[0].indices(x.shape[0]) if shard.index else (0, x.shape[0], 1)
        data = None
        for i, g in enumerate(rows):
            if out[i] is None and start <= g < stop:
                data = np.asarray(shard.data) if data is None else data
                out[i] = data[g - start]
    missing = [int(g) for g, o in zip(rows, out, strict=True) if o is None]
    if missing:
        raise RuntimeError(f"rows {missing[:5]} of a {x.shape} array are not on this process")
    return np.stack(out)


def task_loss_sums(
    per: dict[str, np.ndarray], batch: dict[str, np.ndarray], num_tasks: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts) [len(HEADS), num_tasks] of the per-example losses `per[head]` [B, S + 1]
    (index = segment id) of the rows of `batch` (`task_id`, `num_examples`, `segment_ids` and the
    heads' loss masks, the same B rows): an example counts for a head when it has targets of
    that head. Sums and counts add across processes; `task_loss_means` divides."""
    sums = np.zeros((len(HEADS), num_tasks))
    counts = np.zeros((len(HEADS), num_tasks))
    tid = np.asarray(batch["task_id"])
    nex = np.asarray(batch["num_examples"])
    seg = np.asarray(batch["segment_ids"])
    for h, head in enumerate(HEADS):
        losses = np.asarray(per[head], np.float64)
        mask = np.asarray(batch[f"{head}_loss_mask"])
        has = np.zeros(losses.shape, bool)  # examples with targets of this head
        for b in range(losses.shape[0]):
            ids = np.unique(seg[b][mask[b].astype(bool)])
            has[b, ids[(ids > 0) & (ids <= nex[b])]] = True
        for t in range(num_tasks):
            sel = has & (tid == t)[:, None]
            sums[h, t] = losses[sel].sum()
            counts[h, t] = sel.sum()
    return sums, counts


def task_loss_means(sums: np.ndarray, counts: np.ndarray, names: Sequence[str]) -> dict:
    """{"loss_<head>/<task>": mean} for the (head, task) pairs that had examples."""
    return {
        f"loss_{head}/{name}": float(sums[h, t] / counts[h, t])
        for h, head in enumerate(HEADS)
        for t, name in enumerate(names)
        if counts[h, t] > 0
    }


def params_to_host(params: Any) -> Any:
    """Fully gathered numpy copy of (possibly multi-process sharded) params."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, params)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params
    )


def loss_curve(workdir: str | Path) -> dict[int, float]:
    from kimia_jax.training.metrics import read_metrics

    return {s: m["loss"] for s, m in sorted(read_metrics(workdir).items())}


__all__ = [
    "LoopConfig",
    "Trainer",
    "loss_curve",
    "params_to_host",
    "rows_of",
    "task_loss_means",
    "task_loss_sums",
]
