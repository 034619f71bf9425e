"""The FastAPI app's guards, run before any endpoint (and before a body is validated).

- errors in OpenAI's shape: a ``ValidationError`` is 422 naming the field, an ``HTTPException``
  its status with the matching ``type``;
- ``_body_limit``: 411 without a ``Content-Length``, 413 over ``max_body_bytes``;
- ``_authorize``: the admin routes need the admin token (404 without one configured); with an API
  key every other route but ``/healthz`` needs it, ``/docs`` and ``/openapi.json`` included.

Limits and secrets are on ``api.state`` (the replica sets them from its ``ServeArgs``).
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


def make_api() -> FastAPI:
    api = FastAPI(title="modula-ray", description="OpenAI-compatible endpoint for mixtures of LoRA experts")
    api.state.max_body_bytes = ServeArgs.model_fields["max_body_bytes"].default
    api.state.api_key = api.state.admin_token = None

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc.errors()), status_code=422)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {401: "invalid_api_key", 408: "timeout", 503: "overloaded"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), type_=ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                                       code=code), status_code=exc.status_code, headers=exc.headers)

    @api.middleware("http")
    async def _body_limit(request: Request, call_next):
        limit, length = api.state.max_body_bytes, request.headers.get("content-length")
        if request.method == "POST" and length is None:
            return JSONResponse(error_body("a request body needs a Content-Length header", code="length_required"),
                                status_code=411)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse(error_body(f"request body of {length} bytes is over the limit of {limit}",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    @api.middleware("http")  # added last, so it runs first
    async def _authorize(request: Request, call_next):
        path, root = request.scope["path"], request.scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        state = api.state
        if route.startswith(ADMIN_PREFIX):
            if not state.admin_token:
                return _error(404, "the admin endpoint is disabled: no admin token is configured")
            if not _bearer_ok(request, state.admin_token):
                return _error(401, "missing or wrong admin token (Authorization: Bearer <MODULA_RAY_ADMIN_TOKEN>)")
        elif state.api_key and route not in OPEN_PATHS and not _bearer_ok(request, state.api_key):
            return _error(401, "missing or wrong API key (Authorization: Bearer <MODULA_RAY_API_KEY>)")
        return await call_next(request)

    return api


def _bearer_ok(request: Request, secret: str) -> bool:
    given = request.headers.get("authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), secret.encode())


def _error(status: int, message: str) -> JSONResponse:
    code = {401: "invalid_api_key"}.get(status)
    return JSONResponse(error_body(message, type_=ERROR_TYPES[status], code=code), status_code=status)
