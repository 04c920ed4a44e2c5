"""Continuous batching over many adapters on one base model, independent of HTTP.

One background thread owns the model. Every step it
  1. drops cancelled requests (a client that went away frees its row at once),
  2. admits waiting requests up to `max_batch` rows and prefills them together in one forward
     pass, each row with its own adapter (adapters/mixed.py), then merges their KV cache into the
     running batch (batch_cache.py),
  3. runs one decode step for every running row, again each row with its own adapter,
  4. samples each row with its own settings and random generator, applies stop tokens, stop
     strings and max_new_tokens, and retires finished rows (their cache rows and padding go).
So requests join and leave the batch at every step (Orca's iteration-level scheduling, Yu et al.
2022, sec. 3.2) and rows of different adapters share each forward pass (Punica / S-LoRA).

    engine = Engine(lm.model, lm.tokenizer, max_batch=16).start()
    handle = engine.submit(Request(prompt_ids, adapter="dates", gen=GenerationConfig(max_new_tokens=32)))
    print(handle.result().text)          # or: for event in handle: ...  (text deltas)

A greedy row computes what `inference.generate.generate` computes for the same request alone:
the same `prefill` and `decode_step` (inference/generate.py), positions from the attention mask, argmax.
Padding columns are masked, so only float rounding differs. Seeded sampling draws from the row's
own generator exactly as `generate` with that seed does for a batch of one.

Llama-family models decode on the fast decoder (inference/fast_decode.py; `decode="plain"` turns it
off): the running batch lives in a static KV cache written in place (batch_cache.concat_static /
select_static), and a step runs the decoding copy, whose projections are the base weights and, for
rows with adapters, the adapter layers themselves under the row plan. A batch whose adapters the fast
step cannot run (prompt tuning) takes the plain step on the same cache for that step.

Anything else that touches the model (loading or removing an adapter, routing a prompt) must run
on the engine thread between steps: `engine.call(fn)` returns a Future. Adapters that cannot run
per row (DoRA, prefix tuning: see adapters/mixed.py) are refused at admission with an error event.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from plugtune.adapters.mixed import check_row_adapters, mixed_adapters
from plugtune.inference import fast_decode
from plugtune.inference.generate import GenerationConfig, decode_step, prefill, sample_next, stop_token_ids
from plugtune.models.causal_lm import cache_kwarg
from plugtune.serve.batch_cache import concat_rows, concat_static, select_rows, select_static
from plugtune.serve.detokenize import TextStream

log = logging.getLogger("plugtune.serve")


@dataclass
class Request:
    """One prompt to continue: how to sample (`gen`, the type `generate` takes) and what only a
    served request has: stop strings, extra stop tokens, ignore_eos."""

    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    gen: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=16))  # as /v1/completions
    tag: Any = None  # returned with every event (the HTTP layer's choice index)
    stop: tuple[str, ...] = ()  # stop strings, not part of the output
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end tokens
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks); stop_token_ids still stop


@dataclass
class Event:
    """What a request produced since its previous event. The last event has a finish_reason:
    'stop' (end token or stop string), 'length' (max_new_tokens), 'abort' (cancelled) or 'error'."""

    tag: Any
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far, end token included
    error: str | None = None
    status: int = 500  # with an error: 404 unknown adapter, 400 adapter that cannot share a batch, 500 ours


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Handle:
    """A submitted request. Events go to the `sink` given to submit (called on the engine thread),
    or, without one, to a queue read by iterating the handle or by `result()`."""

    def __init__(self, request: Request, sink: Callable[[Event], None] | None = None):
        self.request = request
        self.cancelled = False
        self.finished = threading.Event()
        self._queue: queue.SimpleQueue | None = None if sink is not None else queue.SimpleQueue()
        self._sink = sink if sink is not None else self._queue.put

    def cancel(self) -> None:
        """Stop generating: the row is retired at the next step with finish_reason 'abort'."""
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.finished.set()
        try:
            self._sink(event)
        except RuntimeError:  # the consumer's event loop is gone (server shutting down)
            self.cancelled = True

    def __iter__(self):
        if self._queue is None:
            raise TypeError("this handle delivers its events to the sink given to submit()")
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes; the whole output."""
        if self._queue is None:
            raise TypeError("this handle delivers its events to the sink given to submit()")
        text, ids, last = [], [], None
        deadline = None if timeout is None else time.monotonic() + timeout
        while last is None or last.finish_reason is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                last = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"request not finished after {timeout} s") from None
            text.append(last.text)
            ids += last.token_ids
        return Completion("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          last.error)


@dataclass
class EngineStats:
    """Counters for /metrics; written by the engine thread only."""

    requests: int = 0  # admitted into the batch
    finished: collections.Counter = field(default_factory=collections.Counter)  # (adapter, reason) -> n
    prompt_tokens: int = 0
    generation_tokens: collections.Counter = field(default_factory=collections.Counter)  # adapter -> n
    prefill_batches: int = 0
    prefill_rows: int = 0
    joins: int = 0  # prefills admitted while other rows were decoding (continuous batching at work)
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    batch_size: int = 0  # rows in the latest decode step
    max_batch_size: int = 0
    max_adapters_per_step: int = 0  # most distinct adapters (the base counts as one) in one decode step
    errors: int = 0


class _Row:
    """One running request: its sampling state and output so far."""

    def __init__(self, handle: Handle, tokenizer, end_ids: list[int], device: torch.device):
        self.handle = handle
        req = handle.request
        self.adapter = req.adapter
        self.gen = req.gen
        self.generator = None
        if self.gen.temperature > 0:  # every sampled row has its own stream of random numbers
            seed = self.gen.seed if self.gen.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(end_ids))
        self.out: list[int] = []  # generated tokens, end token excluded
        self.count = 0  # generated tokens, end token included
        self.text = TextStream(tokenizer, req.stop)
        self.reported = 0  # tokens of `out` already sent in events

    def advance(self, token: int) -> str | None:
        """Take the next token; emit what it adds; return the finish reason if the row is done."""
        self.count += 1
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        else:
            self.out.append(token)
            if self.count >= self.gen.max_new_tokens:
                reason = "length"
        delta, stopped = self.text.update(self.out, final=reason is not None)
        if stopped:
            reason = "stop"
        if delta or reason is not None:
            self._event(delta, reason)
        return reason

    def _event(self, text: str, reason: str | None, error: str | None = None) -> None:
        new = self.out[self.reported:]
        self.reported = len(self.out)
        self.handle._emit(Event(self.handle.request.tag, text, new, reason, len(self.handle.request.prompt_ids),
                                self.count, error))


class Engine:
    """The continuous-batching scheduler. `max_batch` bounds the rows decoded together."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, idle_wait: float = 0.5,
                 decode: str = "auto"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if decode not in ("auto", "plain"):
            raise ValueError(f"the serving engine decodes with 'auto' (fast fp32 where it can) or 'plain', got {decode!r}")
        # The static cache needs the fast decoder's architecture; per-step adapters decide the step itself.
        self._static = decode == "auto" and fast_decode.architecture_refusal(model) is None
        self._plan_copy: fast_decode.DecodingCopy | None = None
        self.model = model
        # Decoding runs on this thread while the HTTP side tokenizes prompts: a Rust tokenizer used
        # from two threads can fail with "Already borrowed", so the engine keeps its own copy.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.end_ids = stop_token_ids(tokenizer)
        self.max_batch = max_batch
        self.idle_wait = idle_wait
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._jobs: list[tuple[Callable[[], bool] | None, Callable[[], Any], Future]] = []
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 where a row has a token
        self._last: torch.Tensor | None = None  # (B,) each row's newest token: the next step's input
        self._admitting: list[Handle] = []  # admitted, not yet in the batch (failed on error)
        # The decode batch's per-row adapter plan stays set on the adapter layers while the batch's
        # rows do not change: entering mixed_adapters walks every module, which costs as much as a
        # small model's decode step. It is closed before anything else touches the model.
        self._plan = contextlib.ExitStack()
        self._plan_names: tuple | None = None
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cache_key = cache_kwarg(model)

    # Public side (any thread) --------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self.model.eval()
            self._thread = threading.Thread(target=self._loop, name="plugtune-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request, sink: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request; thread-safe. Its events go to `sink` (called on the engine thread; it
        must not block) or to the handle's own queue."""
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        handle = Handle(request, sink)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], Any], when: Callable[[], bool] | None = None) -> Future:
        """Run `fn` on the engine thread between steps (once `when()` holds, checked there)."""
        future: Future = Future()
        with self._cond:
            self._jobs.append((when, fn, future))
            self._cond.notify_all()
        return future

    def uses_adapter(self, name: str) -> bool:
        """Whether a running or waiting request uses adapter `name` (call on the engine thread)."""
        return any(r.adapter == name for r in self._rows) or any(h.request.adapter == name for h in self._waiting)

    def pause(self) -> None:
        """Hold every step (admission and decoding) until resume(): maintenance, and tests that
        need several requests waiting at once."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # Engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stopping and (self._paused or not (self._waiting or self._rows or self._jobs)):
                        self._cond.wait(self.idle_wait)
                    if self._stopping:
                        break
                ran = self._run_jobs()
                if not (ran or self._rows or self._waiting):
                    with self._cond:  # only jobs waiting for their condition: do not spin
                        self._cond.wait(min(self.idle_wait, 0.05))
                    continue
                try:
                    self._step()
                except Exception as exc:  # never let one bad batch kill the server
                    self._close_plan()
                    log.exception("engine step failed; failing the requests in the batch")
                    self.stats.errors += 1
                    message = f"internal error while generating: {type(exc).__name__}: {exc}"
                    for row in self._rows:
                        row._event("", "error", message)
                    for handle in self._admitting:
                        handle._emit(Event(handle.request.tag, "", [], "error", len(handle.request.prompt_ids), 0,
                                           message))
                    self._reset_batch()
        self._close_plan()
        for row in self._rows:
            row._event("", "abort")
        for handle in self._waiting:
            handle._emit(Event(handle.request.tag, "", [], "abort", len(handle.request.prompt_ids)))
        self._reset_batch()

    def _run_jobs(self) -> bool:
        with self._cond:
            ready = [j for j in self._jobs if j[0] is None or j[0]()]
            self._jobs = [j for j in self._jobs if j not in ready]
        if ready:
            self._close_plan()  # jobs see the model as it is outside a batch
        for _, fn, future in ready:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)
        return bool(ready)

    def _step(self) -> None:
        """One scheduling iteration: retire cancelled rows, admit and prefill newcomers, decode."""
        self._retire([i for i, r in enumerate(self._rows) if r.handle.cancelled], "abort")
        self._admitting = self._admit()
        if self._admitting:
            self._prefill(self._admitting)
        self._admitting = []
        if self._rows:
            self._decode()

    def _admit(self) -> list[Handle]:
        admitted = []
        with self._cond:
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                handle = self._waiting.popleft()
                if handle.cancelled:
                    handle._emit(Event(handle.request.tag, "", [], "abort", len(handle.request.prompt_ids)))
                    continue
                admitted.append(handle)
        ok = []
        for handle in admitted:
            try:  # unknown adapters, and those that cannot share a batch, fail alone
                check_row_adapters(self.model, [handle.request.adapter])
            except (KeyError, ValueError) as exc:
                message = str(exc.args[0] if exc.args else exc)
                handle._emit(Event(handle.request.tag, "", [], "error", len(handle.request.prompt_ids), 0, message,
                                   404 if isinstance(exc, KeyError) else 400))
                self.stats.finished[(handle.request.adapter, "error")] += 1
                continue
            ok.append(handle)
        return ok

    def _prefill(self, handles: list[Handle]) -> None:
        """Prefill the newcomers together (left-padded) and merge them into the running batch."""
        prompts = [h.request.prompt_ids for h in handles]
        self._close_plan()
        with mixed_adapters(self.model, [h.request.adapter for h in handles]):
            logits, mask, cache = prefill(self.model, prompts, self.pad_id)  # as generate() prefills
        rows = [_Row(h, self.tokenizer, self.end_ids, self.device) for h in handles]
        self.stats.prefill_batches += 1
        self.stats.prefill_rows += len(rows)
        self.stats.joins += bool(self._rows)
        self.stats.requests += len(rows)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        tokens = self._sample(logits, rows)
        if self._static:
            self._cache = concat_static(self._cache, fast_decode.StaticCache.from_dynamic(cache, mask, 0))
            self._mask = None  # the static cache holds its mask
        else:
            self._cache, self._mask = concat_rows(self._cache, self._mask, cache, mask)
        self._last = tokens if self._last is None else torch.cat([self._last, tokens])
        self._rows += rows
        self._admitting = []
        self._advance(len(self._rows) - len(rows), tokens.tolist())

    def _decode(self) -> None:
        """One token for every running row, each with its own adapter."""
        names = tuple(r.adapter for r in self._rows)
        if names != self._plan_names:
            self._close_plan()
            self._plan.enter_context(mixed_adapters(self.model, list(names)))
            self._plan_names = names
            # built once per row plan: jobs that change the weights or adapters close the plan first
            self._plan_copy = fast_decode.decoding_copy(self.model) if self._static and \
                fast_decode.refusal(self.model) is None else None
        if self._plan_copy is not None:
            logits = self._plan_copy.step(self._last, self._cache)
        elif self._static:  # adapters the fast step cannot run: the plain step, on the same cache
            dynamic = self._cache.as_dynamic()
            logits, mask = decode_step(self.model, self._last, self._cache.active_mask(), dynamic, self._cache_key)
            self._cache.absorb(dynamic, mask)
        else:
            logits, self._mask = decode_step(self.model, self._last, self._mask, self._cache, self._cache_key)
        st = self.stats
        st.decode_steps += 1
        st.decode_rows += len(names)
        st.batch_size = len(names)
        st.max_batch_size = max(st.max_batch_size, len(names))
        st.max_adapters_per_step = max(st.max_adapters_per_step, len(set(names)))
        self._last = self._sample(logits, self._rows)
        self._advance(0, self._last.tolist())

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """logits (B, V) -> (B,) next tokens: argmax for greedy rows, each sampled row alone with
        its own temperature / top-k / top-p and generator (the draw generate() makes for it)."""
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                tokens[i] = sample_next(logits[i:i + 1], row.gen, row.generator)[0]
        return tokens

    def _advance(self, first: int, tokens: list[int]) -> None:
        """Feed sampled tokens to rows first, first+1, ...; retire those that finished."""
        done = []
        for i, token in enumerate(tokens, start=first):
            row = self._rows[i]
            reason = row.advance(token)
            self.stats.generation_tokens[row.adapter] += 1
            if reason is not None:
                self.stats.finished[(row.adapter, reason)] += 1
                done.append(i)
        self._retire(done, None)

    def _retire(self, indices: list[int], reason: str | None) -> None:
        if not indices:
            return
        if reason is not None:
            for i in indices:
                self._rows[i]._event("", reason)
                self.stats.finished[(self._rows[i].adapter, reason)] += 1
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._reset_batch()
            return
        if self._static:
            select_static(self._cache, keep)
        else:
            self._mask = select_rows(self._cache, self._mask, keep)
        self._last = self._last[torch.tensor(keep, dtype=torch.long, device=self._last.device)]
        self._rows = [self._rows[i] for i in keep]

    def _close_plan(self) -> None:
        self._plan.close()
        self._plan_names = None

    def _reset_batch(self) -> None:
        self._close_plan()  # an idle model carries no row plan
        self._rows, self._cache, self._mask, self._last = [], None, None, None

