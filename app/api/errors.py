"""One error body for every refusal the API makes, and its place in the OpenAPI document.

    {"detail": "one line naming the input and the problem", "errors": [{"loc", "msg", "type"}, ...]}

`detail` is always a string a person can read; `errors` lists the fields at fault (empty when the
problem is not one field's: a missing token, an unknown route, a file that is not a checkpoint). FastAPI
answers validation errors as a list under `detail`; those are rewritten here so that a client reads every
status the same way.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

from app.services.errors import ServiceError
from models.errors import RecmergeError

MAX_FIELDS_IN_DETAIL = 5


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the field's path")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what was refused and why, naming the input")
    errors: list[FieldError] = Field(description="the fields at fault, when the problem is in fields")


WHY = {
    400: "the uploaded file is not what it claims to be (not safetensors, truncated, not text)",
    401: "a token is required for this call and was missing or wrong",
    404: "a resource named in the path or the body does not exist",
    405: "the path exists, the method does not (the Allow header lists the methods)",
    409: "the request conflicts with the state of what it names: a job already over, models of different "
         "datasets or backbones, more Fisher items than the dataset has",
    413: "the request body is larger than RECMERGE_MAX_UPLOAD_BYTES",
    415: "the body's content type is not one this route reads",
    422: "the request is well formed but its values are refused (each field at fault in `errors`)",
    503: "a source the server fetches from is unreachable; try again later",
}
_AUTH_HEADER = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}


def documented(*statuses: int, json_route: bool = True) -> dict[int | str, dict]:
    """`responses=` for a route: each status with the shared error body. FastAPI files a `model` under the
    route's own media type, so a route answering Markdown or bytes names the JSON error body explicitly."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        out[status] = ({"model": ErrorBody} if json_route else
                       {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
        out[status]["description"] = WHY[status]
        if status == 401:
            out[status]["headers"] = _AUTH_HEADER
    return out


def error_response(status: int, detail: str, errors: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status, headers=headers)


def _loc_text(loc) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(parts) or "body"


def validation_response(errors: list[dict]) -> JSONResponse:
    fields = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", "value_error"))}
              for e in errors]
    shown = "; ".join(f"{_loc_text(f['loc'])}: {f['msg']}" for f in fields[:MAX_FIELDS_IN_DETAIL])
    more = len(fields) - MAX_FIELDS_IN_DETAIL
    return error_response(422, shown + (f" (and {more} more)" if more > 0 else ""), fields)


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method of every route whose path matches: Starlette's own 405 names only the first route's."""
    from app.api.access import flat_routes

    methods: set[str] = set()
    for route in flat_routes(app.router.routes):
        if getattr(route, "methods", None) and route.matches({**scope, "method": "__none__"})[0] is not Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


# What Starlette and FastAPI answer when a body cannot be read as the content type it declares (bytes that are
# not UTF-8, a broken multipart stream): a body that cannot be read is refused as malformed JSON is, 422.
_UNREADABLE_BODY = "There was an error parsing the body"


def install(app: FastAPI) -> None:

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_response(list(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.detail == _UNREADABLE_BODY:
            return validation_response([{"loc": ["body"], "msg": "the body cannot be read as its content type "
                                         f"({request.headers.get('content-type', 'none')[:100]})",
                                         "type": "body_unreadable"}])
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(exc.status_code, str(exc.detail), headers=headers or None)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(RecmergeError)
    async def _bad_input(request: Request, exc: RecmergeError):
        return error_response(422, str(exc))
