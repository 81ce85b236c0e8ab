"""OpenAI's error shape and the HTTP status of every failure.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": null}}

400 bad input (the message and `param` name the field), 401 missing or wrong bearer token,
404 unknown model or path, 405 wrong method, 413 body too large, 429 queue full, 500 the
request failed inside the engine, 503 draining or the worker group failed (restarting),
504 the request's deadline (X-Request-Timeout) passed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from starlette.responses import Response

from .schemas import ErrorBody, ErrorDetail

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "internal_error", 503: "service_unavailable", 504: "timeout"}
OUTCOMES = {400: "invalid", 401: "unauthenticated", 404: "invalid", 405: "invalid",
            413: "invalid", 429: "overloaded", 500: "error", 503: "error", 504: "deadline"}
"""The `outcome` label of shardserve_requests_total for each status (as for gRPC)."""


@dataclass
class HttpError(Exception):
    """A failure answered with `status` and OpenAI's error body."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def outcome(self) -> str:
        return OUTCOMES.get(self.status, "error")

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=TYPES.get(
            self.status, "invalid_request_error"), param=self.param, code=self.code))

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return Response(self.body().model_dump_json(), self.status, headers=headers,
                        media_type="application/json")


def invalid(param: str | None, message: str) -> HttpError:
    """400 naming the field: `param: message`."""
    return HttpError(400, f"{param}: {message}" if param else message, param)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif not str(part).startswith(("str", "list[", "int", "function-")):
            # union members ("str", "list[str]") are pydantic's, not the body's, path parts
            out += f".{part}"
    return out


def from_validation(e: ValidationError) -> HttpError:
    """The first problem of a body that did not parse or validate, as a 400 naming its field."""
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": str(e)}
    if first["type"] == "json_invalid":
        return HttpError(400, f"the body is not valid JSON: {first['msg']}", None,
                         "invalid_json")
    param = _loc(tuple(first["loc"]))
    if not param:
        return HttpError(400, f"the body must be a JSON object ({first['msg']})")
    return invalid(param, first["msg"])
