"""Every error type the library raises on bad input, in one module (the bottom floor).

Each is a `ValueError` subclass (so existing `except ValueError` keeps working) whose message names
the argument, message index, file or tensor at fault and what to do about it.
"""

from __future__ import annotations


class KimiaError(ValueError):
    """Base class of the library's input errors."""


class CheckpointError(KimiaError):
    """A checkpoint does not match the model: missing, unused or mis-shaped tensors, bad config."""


class QuantizeMismatchError(CheckpointError):
    """A `quantize=` argument that a quantized model folder does not hold (it was converted with
    another `--quantize`); the message names the folder, both kinds and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model path that does not exist, or holds neither a released nor a converted checkpoint."""


class AudioError(KimiaError):
    """An audio input that cannot be used: unreadable, empty, or with non-finite samples."""


class TokenizerFileError(KimiaError):
    """A tokenizer file is missing or malformed; the message names the file and the problem."""


class PromptError(KimiaError):
    """A malformed message list; the message names the message index and the problem."""


class ShardingError(KimiaError):
    """A tensor dimension that its mesh axes do not divide, under strict sharding."""


class SamplingError(KimiaError):
    """A sampling argument out of range or not finite; the message names the argument."""


class SamplingTypeError(SamplingError, TypeError):
    """A sampling argument of the wrong type (a `TypeError` too, as before)."""


class OutputError(KimiaError):
    """An output request that cannot be honoured (audio asked for but nothing can produce or
    keep it, an output path that cannot be written)."""


class ManifestError(KimiaError):
    """A malformed batch manifest row; the message names the line and the field."""


class StageUnavailableError(KimiaError):
    """A data-preparation model stage was asked for but its package or local weights are absent
    (raised when the pipeline is built, never mid-run; nothing is downloaded)."""
