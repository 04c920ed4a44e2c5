"""An OpenAI-compatible HTTP server for one base model and its adapters (FastAPI).

    app = create_app(plugtune.load("smollm2-135m", adapter={"dates": "runs/dates/adapter"}),
                     ServeSettings(api_key="secret", adapter_dirs=("runs",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints, with OpenAI's and vLLM's names and shapes:
  POST /v1/chat/completions, POST /v1/completions   (stream: SSE `data: {...}` ... `data: [DONE]`)
  GET  /v1/models, GET /v1/models/{id}               (adapters carry `parent` = the base, as in vLLM)
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter  ({"lora_name", "lora_path"})
  GET  /health, GET /metrics                          (open, like vLLM; /v1/* needs the API key if set)

The request's `model` picks the base (its name), an adapter (its name) or `auto` (the router). The
answer's `model` and `adapter` fields name the adapter that answered. With --adapters-dir, a
request for an adapter that is not loaded but exists as <dir>/<name> loads it first (LoRAX-style).

Every error is OpenAI's error body with a 4xx status (5xx only for our own bugs). Generation runs
on the engine thread (engine.py); this module only validates, submits and streams events back.
Adapters that cannot share a batch (DoRA, prefix tuning) are refused at start-up and at load time:
serve them merged (`plugtune merge`) or from a server of their own.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from plugtune.data.tokenize import prompt_ids
from plugtune.inference.language_model import AUTO, LanguageModel
from plugtune.serve import prometheus as metrics
from plugtune.serve.adapters_dir import AdapterPathError, check_name, resolve_adapter_dir
from plugtune.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, chat_messages, validation_error
from plugtune.serve.server import Server, ServeSettings

log = logging.getLogger("plugtune.serve")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/metrics")

__all__ = ["ServeSettings", "create_app"]


class _Guard:
    """Pure ASGI middleware (streaming-safe, unlike BaseHTTPMiddleware): the API key on /v1/*, an
    early 413 from Content-Length, and the status of every answer for /metrics."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    def _refuse(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.server.settings.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not given:
                return APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'.",
                                code="invalid_api_key")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, "Invalid Content-Length header.")
            if int(length) > self.server.settings.max_body_bytes:
                return _too_large(self.server.settings.max_body_bytes)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                return await _error_response(refusal)(scope, receive, send_and_count)
            await self.app(scope, receive, send_and_count)
        finally:
            path = scope["path"]  # known routes only, so that scanners cannot grow the label set
            label = "/v1/models" if path.startswith("/v1/models") else path if path in ROUTES else "other"
            self.server.http[(label, status[0])] = self.server.http.get((label, status[0]), 0) + 1


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes).", code="request_too_large")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_body(request: Request, model: type[BaseModel], limit: int):
    """The JSON body validated as `model`; the size limit holds for chunked bodies too."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:  # hung up while sending: nobody to answer, and not our error (no 500, no traceback)
        raise APIError(499, "client closed the request") from None
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}. Send a JSON object with "
                            "Content-Type: application/json.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


class _AdapterBody(BaseModel):
    lora_name: str
    lora_path: str | None = None


def create_app(lm: LanguageModel, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `lm` (its engine starts and stops with the app)."""
    server = Server(lm, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.shutdown()

    app = FastAPI(title="plugtune", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(_Guard, server=server)
    _add_error_handlers(app)
    for routes in (_health_routes(server), _model_routes(server), _generation_routes(server),
                   _adapter_routes(server)):
        app.include_router(routes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure, ours or the framework's, answered with OpenAI's error body."""

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        return _error_response(APIError(400, f"Invalid request: {err.get('msg', 'invalid')}",
                                        param=".".join(map(str, err.get("loc", ()))) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, type="invalid_request_error",
                                        code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        type="internal_server_error"))


def _health_routes(server: Server) -> APIRouter:
    """GET /health and GET /metrics (Prometheus text)."""
    routes = APIRouter()

    @routes.get("/health")
    async def health():
        if not server.engine.alive:
            raise APIError(503, "the generation engine is not running", type="internal_server_error")
        return {"status": "ok"}

    @routes.get("/metrics")
    async def get_metrics():
        text = metrics.render(server.engine, server.base, server.http, len(server.adapters), server.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return routes


def _model_routes(server: Server) -> APIRouter:
    """GET /v1/models and GET /v1/models/{name}: the base, its adapters, and `auto` with a router."""
    routes = APIRouter()

    @routes.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(server, n) for n in server.known()]}

    @routes.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in server.known():
            raise APIError(404, f"The model '{name}' does not exist. Known models: {', '.join(server.known())}.",
                           param="model", code="model_not_found")
        return _model_card(server, name)

    return routes


def _model_card(server: Server, name: str) -> dict:
    card = {"id": name, "object": "model", "created": server.created, "owned_by": "plugtune",
            "root": str(server.lm.path), "parent": None, "max_model_len": server.context, "permission": []}
    if name in server.adapters:
        entry = server.adapters[name]
        card.update(created=entry["created"], root=entry["path"], parent=server.base, adapter=entry["info"])
    elif name == AUTO:
        card.update(root="router", parent=server.base)
    return card


def _generation_routes(server: Server) -> APIRouter:
    """POST /v1/chat/completions and POST /v1/completions: parse, tokenize, hand to server.generate."""
    routes = APIRouter()
    tokenizer, settings = server.lm.tokenizer, server.settings

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatCompletionRequest, settings.max_body_bytes)
        req.refuse_unsupported()
        messages = chat_messages(req.messages)
        try:
            ids = prompt_ids(tokenizer, messages)
        except Exception as exc:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template cannot render these messages: {exc}", param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await server.generate(request, req, "chat", [ids], [messages], requested, settings.max_tokens,
                                     "messages")

    @routes.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest, settings.max_body_bytes)
        req.refuse_unsupported()
        prompts, texts = _completion_prompts(req.prompt, tokenizer)
        # The legacy completions API defaults to 16 tokens (OpenAI and vLLM alike).
        return await server.generate(request, req, "completion", prompts, texts, req.max_tokens, 16, "prompt")

    return routes


def _adapter_routes(server: Server) -> APIRouter:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names and bodies)."""
    routes = APIRouter()
    settings = server.settings

    @routes.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await read_body(request, _AdapterBody, settings.max_body_bytes)
        try:
            name = check_name(body.lora_name)
        except AdapterPathError as exc:
            raise APIError(400, str(exc), param="lora_name") from None
        if name in (server.base, AUTO) or name in server.adapters or name in server.loading:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            path = resolve_adapter_dir(body.lora_path or name, list(settings.adapter_dirs))
        except AdapterPathError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        await server.load(name, str(path))
        log.info("loaded adapter %s from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @routes.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await read_body(request, _AdapterBody, settings.max_body_bytes)
        if body.lora_name not in server.adapters or body.lora_name in server.unloading:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        await server.unload(body.lora_name)
        log.info("unloaded adapter %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return routes


def _completion_prompts(prompt, tokenizer) -> tuple[list[list[int]], list[str]]:
    """A completions `prompt` (text, texts, token ids, lists of token ids) -> ids and texts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is empty.", param="prompt")
    vocab = len(tokenizer)
    ids, texts = [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            enc = tokenizer(p, add_special_tokens=True)["input_ids"]
            texts.append(p)
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt[{i}] has token ids outside the vocabulary (0..{vocab - 1}).",
                               param="prompt")
            enc = list(p)
            texts.append(tokenizer.decode(enc, skip_special_tokens=True))
        if not enc:
            raise APIError(400, f"prompt[{i}] is empty: it has no tokens.", param="prompt")
        ids.append(enc)
    return ids, texts
