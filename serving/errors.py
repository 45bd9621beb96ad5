"""Request errors with their gRPC status code and the HTTP status REST answers with (TF Serving's mapping)."""

from __future__ import annotations

from typing import Optional

import grpc

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request error with its gRPC status code (mapped to an HTTP status on the REST side)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def invalid(message: str) -> ServingError:
    """INVALID_ARGUMENT (HTTP 400)."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def exhausted(message: str, http_status: int = 413) -> ServingError:
    """RESOURCE_EXHAUSTED: a request beyond a size budget (HTTP 413 on REST)."""
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, http_status)


class StartupError(ValueError):
    """The server cannot start with these settings (bad base path, port, TLS file...); the CLI exits 2."""
