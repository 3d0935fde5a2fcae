"""Errors of adapter generation. All are ``ValoraError``s, so the CLI prints them as one line."""

from __future__ import annotations

from valora.errors import InvalidRequestError, ValoraError


class SpecError(InvalidRequestError):
    """The build spec is malformed: unknown task kind or source type, missing field, bad value."""


class DataError(ValoraError):
    """A knowledge source cannot be read, or too many of its images are missing or corrupt."""


class TeacherError(ValoraError):
    """A teacher model could not be loaded or failed while labelling images."""
