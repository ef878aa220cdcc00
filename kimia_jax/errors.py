"""Every error type the library raises on bad input, in one module (the bottom floor).

Each is a `ValueError` subclass (so existing `except ValueError` keeps working) whose message names
the argument, message index, file or tensor at fault and what to do about it.
"""

from __future__ import annotations


class KimiaError(ValueError):
    """Base class of the library's input errors."""


class CheckpointError(KimiaError):
    """A checkpoint does not match the model: missing, unused or mis-shaped tensors, bad config."""


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
