"""Training: examples -> packed rows -> the compiled, sharded train step (spec training.md).

* `examples`: SFT conversations (official jsonl schema and our records, one helper per task) and
  the seven pre-training layouts as two aligned streams with loss flags, labels and masks;
  truncation with counters; first-fit packing into the §2.4 row tensors (segment ids, restarting
  positions, 30 s Whisper windows, `cont_src` gather index). Streams come from the inference prompt
  builder (`kimia_jax.text.conversation`), the one conversation-to-streams path.
* `loss`: the official two-stream loss (per stream masked mean, summed), token / example means for
  packed batches, per-stream and per-task weights; chunked full-vocabulary CE.
* `optim`: AdamW + warmup/cosine, decay off norms and biases, global-norm clip, the Whisper
  encoder's own optimizer group (frozen: set_to_zero).
* `train_step`: `TrainStep` (one jit per Whisper phase; params, optimizer state and batch sharded by
  logical names; donated state; gradient accumulation over a leading micro-batch axis).
"""
