"""Shared timing helper for the benchmark scripts (no flags: safe to import from any tool)."""

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of `repeats` calls of fn, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_kimia_twin(cfg, *, dtype=None):
    """A transformers Qwen2 doing the same work per token as KimiaLLM `cfg`: main + MIMO layers as
    one stack, plus a second vocabulary head (`head2`) for the audio logits. Random weights.

    Returns (Qwen2ForCausalLM, head2). Imports torch/transformers lazily (benchmarks only).
    """
    import torch
    import transformers

    torch.manual_seed(0)
    qcfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers + cfg.kimia_mimo_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="sdpa", torch_dtype=dtype or torch.float32,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(qcfg).eval()
    return model, torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def jax_generate_runner(
    cfg, batch: int, prompt_len: int, steps: int, output_type: str = "both", params=None
):
    """`run(n)`: our compiled `generate_fixed` on random weights (or `params`) and random prompt
    ids, n steps (prefill included), no stop token, blocking until done. "both" runs the MIMO
    layers and both heads every step (the torch references' work); "text" lets XLA drop them
    (samples unused)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kimia_jax.configs import OutputType
    from kimia_jax.inference import generate as gen
    from kimia_jax.models import kimia_llm
    from kimia_jax.text.conversation import PromptBatch

    if params is None:
        params = kimia_llm.init_params(cfg, jax.random.key(0))
    model = kimia_llm.KimiaLLM(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.kimia_token_offset, (batch, prompt_len)), jnp.int32)
    prompt = PromptBatch(
        audio_ids=ids, text_ids=ids, is_continuous=None, features=None,
        lengths=jnp.full((batch,), prompt_len, jnp.int32),
    )  # fmt: skip
    never = gen.StreamConfig(
        output_type=OutputType(output_type), text_blank=0, text_eos=-1, eod_ids=()
    )

    def run(n: int) -> None:
        out = gen.generate_fixed(params, prompt, jax.random.key(0), model=model, max_new_tokens=n,
                                 stream=never, cache_length=prompt_len + steps + 1)  # fmt: skip
        jax.block_until_ready(out.state)

    return run
