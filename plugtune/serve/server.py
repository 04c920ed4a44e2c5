"""The server's state and request flow, without the routes: the adapter registry, limits, and
turning one OpenAI request into engine requests and its events back into a response or SSE chunks.

Generation runs on the engine thread (engine.py). Everything here runs on the event loop: the
registry is replaced, never mutated, so reads need no lock; anything that touches the model
(loading, unloading, routing) is sent to the engine thread with `engine.call` and awaited.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from plugtune.adapters.io import adapter_method_and_config
from plugtune.adapters.mixed import check_row_adapters
from plugtune.inference.generate import GenerationConfig
from plugtune.inference.language_model import AUTO, LanguageModel
from plugtune.serve.adapters_dir import AdapterPathError, NAME_RE, check_name, resolve_adapter_dir
from plugtune.serve.engine import Engine, Request as EngineRequest
from plugtune.serve.protocol import APIError, SamplingFields, chat_delta, envelope, new_id, now, usage

MAX_CHOICES = 64  # prompts x n per request


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None  # Bearer token required on /v1/* when set
    adapter_dirs: tuple[str, ...] = ()  # run-time loading reads only inside these
    max_batch: int = 16  # rows decoded together
    max_prompt_tokens: int = 4096
    max_tokens: int = 512  # cap on (and default for chat) max_tokens
    max_concurrent: int = 64  # generation requests in flight; more get 429
    max_body_bytes: int = 1 << 20
    served_model_name: str | None = None  # the base's id in /v1/models (default: the --model argument)

    def __post_init__(self):
        for name in ("max_batch", "max_prompt_tokens", "max_tokens", "max_concurrent", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Server:
    """What the endpoints share: the model, the engine, the adapter registry and counters. The
    registry is replaced, never mutated, so the HTTP thread reads it without locks."""

    def __init__(self, lm: LanguageModel, settings: ServeSettings, engine: Engine | None = None):
        self.lm, self.settings = lm, settings
        self.engine = engine or Engine(lm.model, lm.tokenizer, max_batch=settings.max_batch)
        self.base = settings.served_model_name or lm.name
        self.context = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
        self.created = now()
        lm.use(None)  # rows choose their adapter; nothing is applied to every row
        for info in lm.info():
            try:
                check_name(info.name)
                check_row_adapters(lm.model, [info.name])
            except ValueError as exc:
                raise ValueError(f"cannot serve adapter '{info.name}': {exc}") from None
        self.adapters = {i.name: self._entry(i.name) for i in lm.info()}
        self.http: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.unloading: set[str] = set()
        self.loading: dict[str, asyncio.Future] = {}

    def _entry(self, name: str) -> dict:
        """The registry entry of a loaded adapter (runs where the model may be read: start-up or the
        engine thread)."""
        info = next(i for i in self.lm.info() if i.name == name)
        _, cfg = adapter_method_and_config(self.lm.model, name)
        return {"path": info.path, "created": now(), "info": {"method": info.method, "r": getattr(cfg, "r", None)}}

    def known(self) -> list[str]:
        return [self.base, *sorted(self.adapters)] + ([AUTO] if self.lm.router is not None else [])

    # Adapters ---------------------------------------------------------------------------------------
    async def on_engine(self, fn, when=None):
        return await asyncio.wrap_future(self.engine.call(fn, when))

    async def load(self, name: str, path: str) -> None:
        """Load adapter `name` from `path` on the engine thread (concurrent loads of one name share it)."""
        if name in self.loading:
            return await asyncio.shield(self.loading[name])
        future = asyncio.get_running_loop().create_future()
        self.loading[name] = future

        def add():
            self.lm.add_adapter(name, path)
            try:
                check_row_adapters(self.lm.model, [name])
            except ValueError:
                self.lm.remove_adapter(name)
                raise
            return self._entry(name)

        try:
            entry = await self.on_engine(add)
            self.adapters = {**self.adapters, name: entry}
            future.set_result(None)
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else APIError(
                400, f"could not load adapter '{name}' from {path}: {exc}", param="lora_path")
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise error from None
        finally:
            self.loading.pop(name, None)

    async def unload(self, name: str) -> None:
        """Remove adapter `name` once no running or queued request uses it; new requests for it
        are refused from now on."""
        self.unloading.add(name)
        try:
            await self.on_engine(lambda: self.lm.remove_adapter(name), when=lambda: not self.engine.uses_adapter(name))
            self.adapters = {k: v for k, v in self.adapters.items() if k != name}
        finally:
            self.unloading.discard(name)

    async def target(self, model: str) -> str | None:
        """The adapter name for a request's `model` (None: the base; AUTO: route per prompt)."""
        if model == self.base:
            return None
        if model in self.adapters and model not in self.unloading:
            return model
        if model == AUTO:
            if self.lm.router is None:
                raise APIError(400, "model 'auto' needs a router: start the server with --router PATH (the router "
                                    "is also dropped when an adapter it routes to is unloaded)", param="model")
            return AUTO
        if self.settings.adapter_dirs and NAME_RE.match(model) and model not in self.unloading:
            try:
                path = resolve_adapter_dir(model, list(self.settings.adapter_dirs))
            except AdapterPathError:
                path = None
            if path is not None:
                await self.load(model, str(path))
                return model
        raise APIError(404, f"The model '{model}' does not exist. Known models: {', '.join(self.known())}.",
                       param="model", code="model_not_found")

    # Generation ------------------------------------------------------------------------------------
    def limits(self, prompts: list[list[int]], requested: int | None, default: int, param: str) -> int:
        """Check prompt lengths and max_tokens against the server's limits; the max_tokens to use."""
        s = self.settings
        longest = max(len(p) for p in prompts)
        if longest > s.max_prompt_tokens:
            raise APIError(400, f"This request has {longest} prompt tokens, more than this server's limit of "
                                f"{s.max_prompt_tokens} (--max-prompt-tokens). Please shorten the input.",
                           param=param, code="context_length_exceeded")
        if requested is not None and requested > s.max_tokens:
            raise APIError(400, f"max_tokens is {requested}, more than this server's limit of {s.max_tokens} "
                                "(--max-tokens).", param="max_tokens")
        max_tokens = requested if requested is not None else min(default, s.max_tokens)
        if self.context is not None and longest + max_tokens > self.context:
            if requested is not None or longest >= self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                    f"requested {longest + max_tokens} tokens ({longest} in the input, {max_tokens} "
                                    "in the completion). Please reduce the length of the input or completion.",
                               param=param, code="context_length_exceeded")
            max_tokens = self.context - longest
        return max_tokens

    async def generate(self, request: Request, req: SamplingFields, kind: str, prompts: list[list[int]],
                       route_inputs: list, max_tokens: int | None, default_max: int, param: str) -> Response:
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} completions "
                                "per request.", param="n")
        target = await self.target(req.model)
        max_tokens = self.limits(prompts, max_tokens, default_max, param)
        if self.in_flight >= self.settings.max_concurrent:
            raise APIError(429, f"Too many concurrent requests (limit {self.settings.max_concurrent}, "
                                "--max-concurrent); retry later.", type="rate_limit_error", code="rate_limit_exceeded")
        lease = _Lease(self)
        try:
            if target == AUTO:
                lm = self.lm
                tok = self.engine.tokenizer  # the engine thread's own copy (see Engine.__init__)
                adapters = await self.on_engine(lambda: lm.router.route(lm.model, tok, route_inputs))
            else:
                adapters = [target] * len(prompts)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def sink(event):  # engine thread -> this request's event loop
                loop.call_soon_threadsafe(events.put_nowait, event)

            temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
            gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature,
                                   top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0))
            stop, stop_ids = tuple(req.stop_list()), tuple(req.stop_token_ids or ())
            for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
                for j in range(req.n):  # choice j of a seeded request samples with seed + j
                    choice = EngineRequest(ids, adapter, gen if req.seed is None else replace(gen, seed=req.seed + j),
                                           tag=i * req.n + j, stop=stop, stop_token_ids=stop_ids,
                                           ignore_eos=req.ignore_eos)
                    try:
                        handle = self.engine.submit(choice, sink)
                    except RuntimeError as exc:  # shutting down
                        raise APIError(503, str(exc), type="internal_server_error") from None
                    lease.handles.append(handle)
            answer = _Answer(kind, req, adapters, self.base, request, events, self.engine)
            if not req.stream:
                try:
                    return JSONResponse(await answer.collect())
                finally:
                    lease.release()
            chunks = answer.stream(lease)
            try:
                first = await chunks.__anext__()  # errors before the first token are still plain HTTP errors
            except StopAsyncIteration:  # the client left before the first token
                return Response(status_code=499)
        except BaseException:
            lease.release()
            raise
        return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Lease:
    """One generation request's hold on the server: its in-flight slot and its engine handles.
    Released once, whichever way the request ends (done, error, client gone)."""

    def __init__(self, server: Server):
        self.server, self.handles, self.open = server, [], True
        server.in_flight += 1

    def release(self) -> None:
        if self.open:
            self.open = False
            self.server.in_flight -= 1
            for h in self.handles:
                if not h.finished.is_set():
                    h.cancel()


async def _prepend(first: str, rest):
    yield first
    async for chunk in rest:
        yield chunk


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Answer:
    """Turns one request's engine events into an OpenAI response or SSE chunks."""

    def __init__(self, kind: str, req: SamplingFields, adapters: list, base: str, request: Request,
                 events: asyncio.Queue, engine: Engine):
        self.kind, self.n, self.request, self.events, self.engine = kind, req.n, request, events, engine
        self.adapters = [a for a in adapters for _ in range(req.n)]  # per choice
        one = len(set(self.adapters)) == 1
        answered = self.adapters[0] if one else None
        self.head = envelope(kind, new_id("chatcmpl" if kind == "chat" else "cmpl"),
                             (answered or base) if one else req.model, answered, now(), chunk=req.stream)
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.prompt_tokens = self.completion_tokens = 0

    async def next_event(self):
        """The next engine event; None when the client has disconnected (checked every second)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    return None
                if not self.engine.alive:  # never wait for a generator that is gone
                    raise APIError(503, "the generation engine stopped", type="internal_server_error") from None

    def count(self, event) -> None:
        self.completion_tokens += event.completion_tokens
        if event.tag % self.n == 0:  # the n choices of a prompt share its prompt tokens
            self.prompt_tokens += event.prompt_tokens

    @staticmethod
    def error(event) -> APIError:
        message = event.error or "generation failed"
        if event.status == 404:  # e.g. unloaded between routing and admission
            return APIError(404, message, param="model", code="model_not_found")
        if event.status == 400:
            return APIError(400, message, param="model")
        return APIError(500, message, type="internal_server_error")

    async def collect(self) -> dict:
        texts = [[] for _ in self.adapters]
        finish: list[str | None] = [None] * len(self.adapters)
        while any(f is None for f in finish):
            event = await self.next_event()
            if event is None:
                raise APIError(499, "client closed the request")
            if event.finish_reason == "error":
                raise self.error(event)
            texts[event.tag].append(event.text)
            if event.finish_reason is not None:
                finish[event.tag] = event.finish_reason
                self.count(event)
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                        "finish_reason": f, "adapter": a}
                       for i, (t, f, a) in enumerate(zip(texts, finish, self.adapters))]
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": f, "adapter": a}
                       for i, (t, f, a) in enumerate(zip(texts, finish, self.adapters))]
        return {**self.head, "choices": choices, "usage": usage(self.prompt_tokens, self.completion_tokens)}

    def chunk(self, i: int, text: str | None, finish: str | None) -> dict:
        if self.kind == "chat":
            choice = chat_delta(i, {} if text is None else {"content": text}, finish)
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["adapter"] = self.adapters[i]
        return {**self.head, "choices": [choice]}

    async def stream(self, lease: _Lease):
        """SSE chunks. The first one waits for the first event, so that a request refused at
        admission still gets a plain 4xx instead of a broken stream."""
        try:
            event = await self.next_event()
            if event is None:
                return
            if event.finish_reason == "error":
                raise self.error(event)
            out = ""
            if self.kind == "chat":  # OpenAI opens each choice with the assistant role
                out = "".join(_sse({**self.head, "choices": [chat_delta(i, {"role": "assistant", "content": ""})]})
                              for i in range(len(self.adapters)))
            open_choices = len(self.adapters)
            while True:
                if event.finish_reason == "error":  # mid-stream: an error object, as vLLM sends it
                    yield out + _sse(self.error(event).body())
                    out = ""
                    break
                if event.text:
                    out += _sse(self.chunk(event.tag, event.text, None))
                if event.finish_reason is not None:
                    open_choices -= 1
                    self.count(event)
                    out += _sse(self.chunk(event.tag, None, event.finish_reason))
                yield out
                out = ""
                if not open_choices:
                    break
                # From here a disconnect cancels this generator (Starlette listens for it), so no polling.
                event = await self.events.get()
            if self.include_usage:
                yield _sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, self.completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and the response task was cancelled
            lease.release()
