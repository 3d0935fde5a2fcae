"""Typed exceptions raised at valora's boundaries.

Every error names the thing that was wrong and, where possible, what to do about it. The engine
turns an error raised for one request into a failed output for that request and keeps serving
the others; the HTTP server maps each class to a 4xx/5xx status (see ``http_status``).
"""

from __future__ import annotations


class ValoraError(Exception):
    """Base class of every error valora raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"


class InvalidRequestError(ValoraError, ValueError):
    """A request is malformed: bad parameters, unsupported options, bad message layout."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range or inconsistent with another one."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (with image tokens and requested output) exceeds the model's context."""


class ImageError(InvalidRequestError):
    """An image could not be read, is truncated or corrupt, or exceeds a size limit."""


class AdapterNotFoundError(ValoraError, LookupError):
    """No adapter is registered under the requested name."""

    http_status = 404
    error_type = "not_found_error"


class InvalidAdapterError(ValoraError, ValueError):
    """An adapter directory is unusable: missing files, wrong shapes, NaN weights, wrong base."""

    http_status = 400
    error_type = "invalid_request_error"


class QueueFullError(ValoraError):
    """The waiting queue is at its bound; the request was rejected (retry later)."""

    http_status = 503
    error_type = "server_overloaded"


class OutOfResourcesError(ValoraError):
    """A resource pool (KV pages, adapter slots) cannot satisfy a request even when empty."""

    http_status = 400
    error_type = "invalid_request_error"


class EngineDeadError(ValoraError):
    """The engine hit an unrecoverable fault and no longer serves requests."""

    http_status = 503
    error_type = "engine_dead"


class ModelLoadError(ValoraError):
    """A model checkpoint directory could not be loaded."""
