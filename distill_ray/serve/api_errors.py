"""OpenAI-shaped error bodies for the composed apps (the plain student's app has its own)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill_ray.serve.protocol import ApiError

logger = logging.getLogger(__name__)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        body = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def error_reply(exc: ApiError) -> tuple[int, dict]:
    """(status, body) of an error, for answers that cross a Serve handle (exceptions with
    keyword-only constructors do not survive pickling)."""
    return exc.status, exc.body()
