"""The FastAPI app's guards, run before any endpoint (and before a body is validated).

- errors in OpenAI's shape: a ``ValidationError`` is 422 naming the field, an ``HTTPException``
  its status with the matching ``type``;
- ``_body_limit``: 411 without a ``Content-Length``, 413 over ``max_body_bytes``;
- ``_authorize``: the admin routes need the admin token (404 without one configured); with an API
  key every other route but ``/healthz`` needs it, ``/docs`` and ``/openapi.json`` included.

Limits and secrets are in ``STATE`` (the replica sets them from its ``ServeArgs``).
"""
import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .config import ServeArgs
from .schemas import error_body, validation_error_body

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 408: "timeout",
               500: "server_error", 503: "server_overloaded"}
ADMIN_PREFIX, OPEN_PATHS = "/v1/admin/", {"/healthz"}


# The limits and secrets the guards read, set by the replica from its ServeArgs. Module-level, as
# are the guards: Serve ships the deployment class by value, with a copy of the app, but functions of
# an importable module travel by reference, so these are the replica's own module's.
STATE = {"max_body_bytes": ServeArgs.model_fields["max_body_bytes"].default, "api_key": None, "admin_token": None}


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(exc.errors()), status_code=422)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {401: "invalid_api_key", 408: "timeout", 503: "overloaded"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), type_=ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                                   code=code), status_code=exc.status_code, headers=exc.headers)


async def body_limit(request: Request, call_next):
    limit, length = STATE["max_body_bytes"], request.headers.get("content-length")
    if request.method == "POST" and length is None:
        return JSONResponse(error_body("a request body needs a Content-Length header", code="length_required"),
                            status_code=411)
    if length is not None and (not length.isdigit() or int(length) > limit):
        return JSONResponse(error_body(f"request body of {length} bytes is over the limit of {limit}",
                                       code="request_too_large"), status_code=413)
    return await call_next(request)


async def authorize(request: Request, call_next):
    path, root = request.scope["path"], request.scope.get("root_path", "")
    route = path[len(root):] if root and path.startswith(root) else path
    if route.startswith(ADMIN_PREFIX):
        if not STATE["admin_token"]:
            return _error(404, "the admin endpoint is disabled: no admin token is configured")
        if not _bearer_ok(request, STATE["admin_token"]):
            return _error(401, "missing or wrong admin token (Authorization: Bearer <MODULA_RAY_ADMIN_TOKEN>)")
    elif STATE["api_key"] and route not in OPEN_PATHS and not _bearer_ok(request, STATE["api_key"]):
        return _error(401, "missing or wrong API key (Authorization: Bearer <MODULA_RAY_API_KEY>)")
    return await call_next(request)


def make_api() -> FastAPI:
    api = FastAPI(title="modula-ray", description="OpenAI-compatible endpoint for mixtures of LoRA experts")
    api.add_exception_handler(RequestValidationError, invalid_body)
    api.add_exception_handler(HTTPException, http_error)
    api.middleware("http")(body_limit)
    api.middleware("http")(authorize)  # added last, so it runs first
    return api


def _bearer_ok(request: Request, secret: str) -> bool:
    given = request.headers.get("authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), secret.encode())


def _error(status: int, message: str) -> JSONResponse:
    code = {401: "invalid_api_key"}.get(status)
    return JSONResponse(error_body(message, type_=ERROR_TYPES[status], code=code), status_code=status)
