"""Every on-disk name of a Kimi-Audio model folder, named once.

Released layout (`moonshotai/Kimi-Audio-7B-Instruct`, plus `THUDM/glm-4-voice-tokenizer`, which the
official code fetches from the hub and we look up next to the LLM):

    <root>/config.json, model-<i>-of-<n>.safetensors, model.safetensors.index.json   LLM
    <root>/tiktoken.model, tokenizer_config.json, special_tokens_map.json           text tokenizer
    <root>/glm-4-voice-tokenizer/{config.json, model.safetensors, preprocessor_config.json}
    <root>/whisper-large-v3/{config.json, model.safetensors}
    <root>/audio_detokenizer/{config.yaml, model.pt}, <root>/vocoder/{config.json, model.pt}

Converted layout (`kimia_jax.conversion.convert_all`): every model directory is an Orbax checkpoint
(`params/` + `kimia_jax.json`) holding its released config file(s) verbatim:

    <out>/                          LLM + config.json + the text tokenizer files
    <out>/glm-4-voice-tokenizer/    GLM-4-Voice VQ encoder (+ config.json, preprocessor_config.json)
    <out>/whisper-large-v3/         whisper encoder (+ config.json)
    <out>/detokenizer/              DiT + vocoder (+ config.yaml, vocoder_config.json)
"""

from __future__ import annotations

# Sub-folders of a model root.
GLM_TOKENIZER_DIR = "glm-4-voice-tokenizer"
WHISPER_DIR = "whisper-large-v3"
DIT_DIR = "audio_detokenizer"  # released
VOCODER_DIR = "vocoder"  # released
DETOKENIZER_DIR = "detokenizer"  # converted (Orbax): DiT + vocoder together

# Config and weight files.
CONFIG_JSON = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
DIT_CONFIG = "config.yaml"  # in audio_detokenizer/ (released) or detokenizer/ (converted)
VOCODER_CONFIG = "config.json"  # in vocoder/ (released)
VOCODER_CONFIG_CONVERTED = "vocoder_config.json"  # in detokenizer/ (converted)
TORCH_WEIGHTS = "model.pt"  # audio_detokenizer/ and vocoder/
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_shard(i: int, n: int) -> str:
    """The release's irregular, unpadded shard names: `model-1-of-4.safetensors`."""
    return f"model-{i}-of-{n}.safetensors"


# Text tokenizer files (kimia_jax.text.tokenizer reads them).
TEXT_VOCAB = "tiktoken.model"
TEXT_TOKENIZER_CONFIG = "tokenizer_config.json"
TEXT_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TEXT_TOKENIZER_FILES = (TEXT_VOCAB, TEXT_TOKENIZER_CONFIG, TEXT_SPECIAL_TOKENS_MAP)

# Our converted Orbax directory (kimia_jax.checkpoint).
ORBAX_PARAMS_DIR = "params"
ORBAX_META = "kimia_jax.json"

# Entries of the torch checkpoints.
DIT_STATE_DICT_ENTRY = "state_dict"  # Lightning checkpoint
DIT_KEY_PREFIX = "speech_model."  # the DiT's weights inside it
VOCODER_STATE_DICT_ENTRY = "generator"
