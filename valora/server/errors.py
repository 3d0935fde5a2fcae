"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers — a typed ``ValoraError`` from the engine, a body that does not
validate, malformed JSON, an unknown route, an unexpected exception — goes through
``error_response`` so that clients see one shape. ``code`` is the HTTP status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from valora.errors import InvalidRequestError, ValoraError
from valora.logger import get_logger

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

logger = get_logger(__name__)

_TYPES_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    405: "invalid_request_error", 413: "request_too_large",
                    503: "server_overloaded"}


class ParamError(InvalidRequestError):
    """A 400 that names the offending request parameter (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class HTTPError(ValoraError):
    """An HTTP-level refusal with an explicit status (401, 403, 413 ...)."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.error_type = error_type or _TYPES_BY_STATUS.get(status, "invalid_request_error")


def error_body(message: str, error_type: str, status: int,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and OpenAI error body for any exception (non-``ValoraError`` ones are 500s)."""
    if isinstance(exc, ValoraError):
        param = getattr(exc, "param", None)
        return exc.http_status, error_body(str(exc), exc.error_type, exc.http_status, param)
    return 500, error_body(f"internal server error: {type(exc).__name__}", "internal_error", 500)


def error_response(exc: BaseException) -> JSONResponse:
    from fastapi.responses import JSONResponse

    status, body = error_for(exc)
    return JSONResponse(body, status_code=status)


_TYPE_TOKENS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _clean_location(loc: tuple[Any, ...] | list[Any]) -> list[str]:
    """Drop ``body`` and pydantic's union-member markers (``str``, ``list[int]``, the tag of a
    tagged union, which repeats the field name) from an error location."""
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if (text == "body" and not parts) or "[" in text or text in _TYPE_TOKENS:
            continue
        if parts and parts[-1] == text and not text.isdigit():
            continue
        parts.append(text)
    return parts


def _describe_validation(errors: list[dict[str, Any]]) -> ParamError:
    """Turn pydantic's error list into one clear message naming the most specific bad parameter."""
    first = max(errors, key=lambda error: len(error.get("loc", ())))
    location = _clean_location(first.get("loc", ()))
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return ParamError(f"malformed JSON in the request body: {detail}")
    if kind == "extra_forbidden":
        return ParamError(f"unsupported parameter '{param}': valora does not know it", param=param)
    if kind == "missing" and not location:
        return ParamError("the request body is missing or is not a JSON object")
    if kind == "missing":
        return ParamError(f"missing required parameter '{param}'", param=param)
    if kind in ("model_attributes_type", "dict_type") and not location:
        return ParamError("the request body must be a JSON object")
    same_place = [e for e in errors if _clean_location(e.get("loc", ())) == location]
    if len(same_place) == len(errors) > 1:  # one value matched none of a union's members
        message = " or ".join(dict.fromkeys(str(e.get("msg", "")) for e in errors))
    else:
        message = str(first.get("msg", kind))
    return ParamError(f"invalid value for '{param}': {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through ``error_response``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def on_valora(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_describe_validation(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(HTTPError(exc.status_code, message))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(exc)

    app.add_exception_handler(ValoraError, on_valora)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
