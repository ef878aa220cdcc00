"""Detokenizer: semantic tokens -> mel (flow-matching DiT, chunked look-ahead) -> wav (BigVGAN).

det = Detokenizer.from_pretrained("Kimi-Audio-7B-Instruct")     # released folder or converted dir
det.warmup()                                    # optional: compile all chunk shapes now
wav = det.detokenize(codes, key=jax.random.key(0))              # whole utterance
for piece in det.stream(token_iterator, key=jax.random.key(0)):  # same samples, chunk by chunk
    play(piece)
state = det.new_state()                         # or chunk by chunk, the state a returned value:
wav, state = det.detokenize_chunk(state, codes[:30], is_final=False, key=0)
voice = det.prefill(ref_wav_24k, ref_tokens)     # voice prompt (official `prefill`)
wav = det.detokenize(codes, key=0, prompt=voice)  # in the reference clip's voice
"""

from kimia_jax.detokenizer.detokenizer import (
    Detokenizer,
    DetokenizerState,
    MelNorm,
    StreamingConfig,
    VoicePrompt,
    euler_schedule,
    plan_chunks,
    torch_linspace_f32,
)
from kimia_jax.detokenizer.stitch import StitchState, hamming_periodic, stitch
from kimia_jax.detokenizer.wav import write_wav

__all__ = [
    "Detokenizer",
    "DetokenizerState",
    "MelNorm",
    "StreamingConfig",
    "StitchState",
    "VoicePrompt",
    "euler_schedule",
    "hamming_periodic",
    "plan_chunks",
    "stitch",
    "torch_linspace_f32",
    "write_wav",
]
