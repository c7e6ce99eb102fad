"""Errors raised by realizar-jax.

Every problem with a model file is a `ModelFormatError` (a ValueError) that names the file and,
where one is to blame, the tensor. Callers catch the base class; tests check the subclass.
"""
from __future__ import annotations


class RealizarError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFormatError(RealizarError, ValueError):
    """A model file or folder cannot be used as it is."""

    def __init__(self, message: str, *, path=None, tensor: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class DamagedFileError(ModelFormatError):
    """The file is truncated, has a bad magic number, or lies about its own layout."""


class UnknownArchitectureError(ModelFormatError):
    """The model's architecture is not one realizar-jax implements."""


class MissingTensorError(ModelFormatError):
    """A tensor the architecture needs is not in the file."""


class ShapeMismatchError(ModelFormatError):
    """A tensor's shape disagrees with the model config."""


class UnsupportedQuantError(ModelFormatError):
    """A tensor is stored in a quantization type realizar-jax cannot read."""


class InsufficientMemoryError(RealizarError, MemoryError):
    """The model would not fit in the device memory that is free."""


class TokenizerError(ModelFormatError):
    """The model's tokenizer is missing or cannot be built (its message names the file)."""


class ChatTemplateError(RealizarError, ValueError):
    """The model has no chat template, or its template failed to render."""
