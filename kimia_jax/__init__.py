"""kimia_jax: Kimi-Audio in JAX/Flax (audio tokenizer, dual-head audio LLM, detokenizer).

Importing this package never imports torch; torch is only used by tests and the converters of
PyTorch state dicts.
"""

__version__ = "0.1.0"
