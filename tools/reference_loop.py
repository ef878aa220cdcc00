"""PyTorch transcriptions of the official sampler and generation loop (parity tests, bench_sampler).

Transcribed statement by statement from MoonshotAI/Kimi-Audio commit
2607d515f5b7dffa1dcc7526f9f26feb48e356c4:
* `ref_sample`: kimia_infer/utils/sampler.py `KimiASampler.sample_{text,audio}_logits` (the two
  methods are the same algorithm with different parameters);
* `ref_generate_loop`: kimia_infer/api/kimia.py `KimiAudio._generate_loop`, with the model forward
  replaced by a fixed list of per-step logits (a model-free loop: the logits do not depend on what
  is fed, which is all the bookkeeping needs) and CPU tensors instead of CUDA ones.
"""

from __future__ import annotations

import numpy as np
import torch


def ref_penalised(logits: torch.Tensor, recent_tokens, penalty: float, window: int) -> torch.Tensor:
    """The repetition-penalty block of the reference, on [1, V] logits (returns [1, V])."""
    if penalty > 1.0 and recent_tokens is not None and len(recent_tokens) > window:
        logits = logits[0]
        recent_window = recent_tokens[-window:].long()
        scores = torch.gather(logits, dim=0, index=recent_window)
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        logits.scatter_(dim=0, index=recent_window, src=scores)
        logits = logits.unsqueeze(0)
    return logits


def ref_sample(
    logits: torch.Tensor,
    recent_tokens=None,
    *,
    top_k: int,
    temperature: float,
    penalty: float,
    window: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if len(logits.shape) == 3:
        logits = logits[:, -1]
    logits = ref_penalised(logits, recent_tokens, penalty, window)
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float)
    if temperature > 1e-6:
        logprobs = logprobs / temperature
        if top_k > 0:
            probs = torch.exp(logprobs)
            top_k_probs, top_k_indices = torch.topk(probs, top_k, dim=-1)
            sampled = torch.multinomial(top_k_probs, num_samples=1, generator=generator).squeeze(1)
            return top_k_indices.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        return torch.multinomial(torch.exp(logprobs), num_samples=1, generator=generator).squeeze(1)
    return torch.argmax(logprobs, dim=-1)


def ref_generate_loop(
    text_logits: np.ndarray,
    audio_logits: np.ndarray,
    *,
    max_new_tokens: int,
    output_type: str,
    blank: int,
    text_eos: int,
    eod_ids: tuple[int, int],
    text_params: dict,
    audio_params: dict,
):
    """Returns (audio_tokens, text_tokens, fed); fed[k] = (audio, text) that forward call k + 1
    consumes (llm.md §10 `_fed_*`)."""
    delay = 6
    text_stream_is_finished = False
    previous_audio_tokens = torch.zeros((4096,), dtype=torch.int)
    text_previous_tokens = torch.zeros((4096,), dtype=torch.int)
    valid_text_length = 0
    valid_audio_length = 0
    fed = []
    for i in range(max_new_tokens):
        t_logits = torch.from_numpy(np.array(text_logits[i], np.float32))[None, None]
        a_logits = torch.from_numpy(np.array(audio_logits[i], np.float32))[None, None]
        next_token_text = ref_sample(
            t_logits, text_previous_tokens[:i] if i > 0 else None, **text_params
        )
        next_audio_token = ref_sample(
            a_logits, previous_audio_tokens[:i] if i > 0 else None, **audio_params
        )
        if text_stream_is_finished:
            next_token_text.fill_(blank)
        elif next_token_text.item() == text_eos:
            text_stream_is_finished = True
        else:
            valid_text_length += 1
        text_previous_tokens[i : i + 1] = next_token_text
        if i < delay:
            next_audio_token.fill_(blank)
        else:
            if output_type == "text":
                next_audio_token.fill_(blank)
            else:
                valid_audio_length += 1
        previous_audio_tokens[i : i + 1] = next_audio_token
        audio_stream_is_finished = next_audio_token.item() in eod_ids
        if (
            output_type == "text"
            and text_stream_is_finished
            or output_type == "both"
            and audio_stream_is_finished
        ):
            break
        if i + 1 < max_new_tokens:  # the last step's inputs are assigned but never forwarded
            fed.append((next_audio_token.item(), next_token_text.item()))
    text_tokens = text_previous_tokens[:valid_text_length].numpy().tolist()
    audio_tokens = previous_audio_tokens[delay : valid_audio_length + delay].numpy().tolist()
    return audio_tokens, text_tokens, fed
