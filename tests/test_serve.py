"""plugtune serve: the continuous-batching engine against `generate` on a tiny model, then the
OpenAI-compatible HTTP server over real loopback HTTP, driven by the official `openai` client
(and httpx for requests the client would never send)."""
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import plugtune
from plugtune.adapters import adapter_state, attach_adapter, save_adapter
from plugtune.data.tokenize import prompt_ids
from plugtune.inference.generate import GenerationConfig, generate
from plugtune.serve.adapters_dir import AdapterPathError, resolve_adapter_dir
from plugtune.serve.batch_cache import concat_rows, select_rows
from plugtune.serve.detokenize import TextStream
from plugtune.serve.engine import Engine, Request

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test"
PROMPTS = ["hello world", "what is the date of March 5", "convert 3 km", "the quick brown fox jumps over"]
DATES = ["convert date March 5 2019", "what is the date of May 1", "date June 7 answer iso", "March 9 date"]
UNITS = ["convert 3 km to m", "what is 5 kg in g", "convert 7 m to cm", "10 km is how many m"]


def make_adapter(base_dir, out, name, cfg=None, method="lora", seed=0):
    """A saved adapter with random (non-zero) weights, so its answers differ from the base's."""
    lm = plugtune.load(str(base_dir))
    attach_adapter(lm.model, method, {"r": 4} if cfg is None else cfg, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(lm.model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(lm.model, out, name)
    return Path(out)


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """Allowed adapter directory with a, b, c (c is loaded at run time), and one outside it."""
    top = tmp_path_factory.mktemp("serve")
    allowed = top / "adapters"
    for seed, name in enumerate(["a", "b", "c"], start=1):
        make_adapter(tiny_model_dir, allowed / name, name, seed=seed)
    make_adapter(tiny_model_dir, allowed / "dora", "dora", {"r": 4, "use_dora": True}, seed=4)
    make_adapter(tiny_model_dir, top / "outside" / "x", "x", seed=9)
    os.symlink(top / "outside" / "x", allowed / "escape")  # a symlink leaving the directory
    return allowed


@pytest.fixture(scope="module")
def ref(tiny_model_dir, root):
    """A second copy of the model and adapters, for reference answers computed with generate()."""
    lm = plugtune.load(str(tiny_model_dir), adapter={n: root / n for n in "abc"})
    lm.use(None)
    return lm


def reference(lm, prompt, adapter, n, chat=True, cfg=None):
    cfg = cfg or GenerationConfig(max_new_tokens=n)
    return generate(lm.model, lm.tokenizer, [prompt], cfg, chat=chat, adapter_names=[adapter])[0]


def chat_ids(tokenizer, text):
    return prompt_ids(tokenizer, [{"role": "user", "content": text}])


# The engine alone ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir, root):
    lm = plugtune.load(str(tiny_model_dir), adapter={"a": root / "a", "b": root / "b"})
    lm.use(None)
    eng = Engine(lm.model, lm.tokenizer, max_batch=8).start()
    eng.lm = lm
    yield eng
    eng.shutdown()


def submit_together(engine, requests):
    """Submit while paused, so that every request is admitted in the same step."""
    engine.pause()
    try:
        handles = [engine.submit(r) for r in requests]
    finally:
        engine.resume()
    return [h.result(timeout=30) for h in handles]


def test_engine_mixed_batch_equals_generate_alone(engine, ref):
    names = ["a", "b", None, "a"]
    before = engine.stats.prefill_batches
    outs = submit_together(engine, [Request(chat_ids(ref.tokenizer, p), n, GenerationConfig(max_new_tokens=12))
                                    for p, n in zip(PROMPTS, names)])
    for out, p, n in zip(outs, PROMPTS, names):
        assert out.text == reference(ref, p, n, 12)
        assert out.finish_reason == "length" and out.completion_tokens == 12
    assert engine.stats.prefill_batches == before + 1  # the four were prefilled together
    assert engine.stats.max_adapters_per_step >= 3
    assert len({o.text for o in outs[:3]}) == 3  # the adapters really answer differently


def test_engine_join_and_retire_keep_answers(engine, ref):
    """A long-prompt row that retires early (its columns get trimmed) and a newcomer that joins
    mid-decode leave the other rows' answers unchanged."""
    tok = ref.tokenizer
    long_prompt = " ".join(PROMPTS)
    joins = engine.stats.joins
    h_short = engine.submit(Request(chat_ids(tok, PROMPTS[0]), "a", GenerationConfig(max_new_tokens=30)))
    h_long = engine.submit(Request(chat_ids(tok, long_prompt), "b", GenerationConfig(max_new_tokens=3)))
    stream = iter(h_short)
    first = next(stream)  # h_short is decoding now
    h_new = engine.submit(Request(chat_ids(tok, PROMPTS[2]), None, GenerationConfig(max_new_tokens=10)))
    text = first.text + "".join(e.text for e in stream)
    assert text == reference(ref, PROMPTS[0], "a", 30)
    assert h_long.result(10).text == reference(ref, long_prompt, "b", 3)
    assert h_new.result(10).text == reference(ref, PROMPTS[2], None, 10)
    assert engine.stats.joins > joins
    assert engine.num_running == 0


def test_engine_seeded_sampling_equals_generate(engine, ref):
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    tok = ref.tokenizer
    outs = submit_together(engine, [Request(chat_ids(tok, PROMPTS[1]), "b", cfg),
                                    Request(chat_ids(tok, PROMPTS[0]), "a", GenerationConfig(max_new_tokens=10)),
                                    Request(chat_ids(tok, PROMPTS[1]), "b", GenerationConfig(
                                        max_new_tokens=10, temperature=0.9, top_p=0.9, seed=8))])
    assert outs[0].text == reference(ref, PROMPTS[1], "b", 10, cfg=cfg)
    assert outs[0].text != outs[2].text  # another seed, another sample


def test_engine_stop_strings_and_stop_tokens(engine, ref):
    tok = ref.tokenizer
    ids = chat_ids(tok, PROMPTS[3])
    full = engine.submit(Request(ids, "a", GenerationConfig(max_new_tokens=16))).result(10)
    stop = full.text[5:8]
    events = list(engine.submit(Request(ids, "a", GenerationConfig(max_new_tokens=16), stop=(stop, "\x07never"))))
    text = "".join(e.text for e in events)
    assert text == full.text[:full.text.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)
    # a token's first use after the first (0: a reply that repeats one token, cut at its first token)
    k = next((i for i, t in enumerate(full.token_ids) if i and t not in full.token_ids[:i]), 0)
    cut = engine.submit(Request(ids, "a", GenerationConfig(max_new_tokens=16), stop_token_ids=(full.token_ids[k],)))
    out = cut.result(10)
    assert out.token_ids == full.token_ids[:k] and out.finish_reason == "stop" and out.completion_tokens == k + 1


def test_engine_cancel_frees_the_slot(tiny_model_dir, ref):
    eng = Engine(ref.model, ref.tokenizer, max_batch=1).start()
    try:
        tok = ref.tokenizer
        long = eng.submit(Request(chat_ids(tok, PROMPTS[0]), None, GenerationConfig(max_new_tokens=200),
                                  ignore_eos=True))
        queued = eng.submit(Request(chat_ids(tok, PROMPTS[1]), None, GenerationConfig(max_new_tokens=5)))
        events = iter(long)
        next(events)
        long.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "abort"
        assert sum(len(e.token_ids) for e in rest) < 199
        assert queued.result(10).text == reference(ref, PROMPTS[1], None, 5)
        assert eng.num_running == 0
    finally:
        eng.shutdown()


def test_engine_refuses_rows_that_cannot_share_a_batch(engine, ref):
    attach_adapter(engine.lm.model, "lora", {"r": 4, "use_dora": True}, name="dora", trainable=False)
    try:
        tok = ref.tokenizer
        bad = engine.submit(Request(chat_ids(tok, PROMPTS[0]), "dora", GenerationConfig(max_new_tokens=4)))
        good = engine.submit(Request(chat_ids(tok, PROMPTS[0]), "a", GenerationConfig(max_new_tokens=4)))
        out = bad.result(10)
        assert out.finish_reason == "error" and "DoRA" in out.error
        missing = engine.submit(Request(chat_ids(tok, PROMPTS[0]), "nope", GenerationConfig(max_new_tokens=4)))
        missing = missing.result(10)
        assert missing.finish_reason == "error" and "no adapter named 'nope'" in missing.error
        assert good.result(10).text == reference(ref, PROMPTS[0], "a", 4)
    finally:
        engine.call(lambda: engine.lm.remove_adapter("dora")).result(10)


def test_engine_serves_every_per_row_method(tiny_model_dir, tmp_path):
    """Soft prompts (extra prefill columns, masked per row), IA3 and bottleneck rows decode with
    LoRA and base rows, and rows that join mid-decode, as each would alone."""
    dirs = {"lora": make_adapter(tiny_model_dir, tmp_path / "l", "l", seed=1),
            "pt": make_adapter(tiny_model_dir, tmp_path / "pt", "pt", {"num_virtual_tokens": 5}, "prompt_tuning", 2),
            "ia3": make_adapter(tiny_model_dir, tmp_path / "ia3", "ia3", {}, "ia3", 3),
            "bn": make_adapter(tiny_model_dir, tmp_path / "bn", "bn", {}, "bottleneck", 4)}
    lm = plugtune.load(str(tiny_model_dir), adapter=dirs)
    lm.use(None)
    tok = lm.tokenizer
    jobs = [(PROMPTS[0], "pt"), (PROMPTS[1], "lora"), (PROMPTS[2], None), (PROMPTS[3], "pt"), ("x", "ia3"),
            (PROMPTS[1], "bn")]
    refs = [reference(lm, p, n, 12) for p, n in jobs]
    eng = Engine(lm.model, tok, max_batch=8).start()
    try:
        eng.pause()
        first = [eng.submit(Request(chat_ids(tok, p), n, GenerationConfig(max_new_tokens=12))) for p, n in jobs[:3]]
        eng.resume()
        stream = iter(first[0])
        head = next(stream)  # the first three are decoding: the others join them
        later = [eng.submit(Request(chat_ids(tok, p), n, GenerationConfig(max_new_tokens=12))) for p, n in jobs[3:]]
        texts = [head.text + "".join(e.text for e in stream)] + [h.result(10).text for h in first[1:] + later]
        assert texts == refs
        assert eng.stats.joins >= 1
    finally:
        eng.shutdown()


def test_cache_merge_pads_left_and_retire_trims():
    from transformers import DynamicCache

    def cache_of(keys):
        c = DynamicCache()
        c.update(keys, keys + 100, 0)
        return c

    k1 = torch.arange(1, 1 + 1 * 2 * 3 * 1, dtype=torch.float).view(1, 2, 3, 1)  # (B=1, H=2, T=3, D=1)
    k2 = torch.arange(50, 50 + 2 * 2 * 5 * 1, dtype=torch.float).view(2, 2, 5, 1)  # (B=2, T=5)
    m1, m2 = torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    cache, mask = concat_rows(cache_of(k1), m1, cache_of(k2), m2)
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 1)
    torch.testing.assert_close(keys[0, :, 2:], k1[0])  # old row moved right by 2 columns
    assert keys[0, :, :2].abs().sum() == 0
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    mask = select_rows(cache, mask, [2, 0])  # retire the full-length row: 2 leading columns are dead
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    torch.testing.assert_close(cache.layers[0].keys[1], k1[0])
    torch.testing.assert_close(cache.layers[0].values[0], k2[1, :, 2:] + 100)


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    class Chars:  # decode = the token ids' characters; 0 stands for half a UTF-8 character
        def decode(self, ids, skip_special_tokens=True):
            return "".join("\ufffd" if i == 0 else chr(i) for i in ids)

    s = TextStream(Chars(), ("END",))
    out = [s.update([ord(c) for c in "abE"])[0], s.update([ord(c) for c in "abEN"])[0],
           s.update([ord(c) for c in "abENx"])[0], s.update([ord(c) for c in "abENxE"])[0]]
    assert out == ["ab", "", "ENx", ""]
    assert s.update([ord(c) for c in "abENxEND"]) == ("", True)
    t = TextStream(Chars())
    assert t.update([ord("a"), 0]) == ("a", False)  # the half character waits
    assert t.update([ord("a"), ord("é")], final=True) == ("é", False)


# Over HTTP ---------------------------------------------------------------------------------------------
class Live:
    def __init__(self, app, port):
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = app.state.server
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def metrics(self):
        from plugtune.serve.prometheus import parse

        return parse(self.http.get("/metrics").text)


@pytest.fixture(scope="module")
def live(tiny_model_dir, root, tmp_path_factory):
    from plugtune.inference.router import fit_router
    from plugtune.serve.app import ServeSettings, create_app

    lm = plugtune.load(str(tiny_model_dir), adapter={"a": root / "a", "b": root / "b"})
    router_dir = tmp_path_factory.mktemp("router")
    fit_router(lm.model, lm.tokenizer, {"a": DATES, "b": UNITS}).save(router_dir)
    lm.load_router(router_dir)
    settings = ServeSettings(api_key=KEY, adapter_dirs=(str(root),), max_batch=8, max_prompt_tokens=64,
                             max_tokens=220, max_concurrent=4, max_body_bytes=20_000, served_model_name="tiny")
    app = create_app(lm, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield Live(app, sock.getsockname()[1])
    server.should_exit = True
    thread.join(10)


def chat(live, model, text, **kw):
    kw.setdefault("max_tokens", 10)
    kw.setdefault("temperature", 0)
    return live.client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_chat_and_completions_equal_generate(live, ref):
    for model, adapter in [("a", "a"), ("b", "b"), ("tiny", None)]:
        r = chat(live, model, PROMPTS[1])
        assert r.choices[0].message.content == reference(ref, PROMPTS[1], adapter, 10)
        assert r.model == model and r.adapter == adapter and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(chat_ids(ref.tokenizer, PROMPTS[1])) and r.usage.completion_tokens == 10
    chunks = list(chat(live, "a", PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(ref, PROMPTS[1], "a", 10)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    c = live.client.completions.create(model="b", prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=6, temperature=0)
    assert [x.text for x in c.choices] == [reference(ref, p, "b", 6, chat=False) for p in (PROMPTS[0], PROMPTS[2])]
    streamed = "".join(x.choices[0].text for x in live.client.completions.create(
        model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    two = chat(live, "a", PROMPTS[0], n=2, temperature=0.8, seed=3)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.8, seed=3)
    assert two.choices[0].message.content == reference(ref, PROMPTS[0], "a", 10, cfg=cfg)
    assert two.choices[1].message.content != two.choices[0].message.content


def test_models_list_base_adapters_and_auto(live, root):
    models = {m.id: m for m in live.client.models.list().data}
    assert list(models) == ["tiny", "a", "b", "auto"]
    assert models["a"].parent == "tiny" and models["a"].root == str(root / "a")
    assert models["tiny"].parent is None and models["tiny"].max_model_len == 256
    assert live.client.models.retrieve("b").adapter == {"method": "lora", "r": 4}


def test_auto_uses_the_router(live, ref):
    router = live.server.lm.router  # its features come from the base alone, so ref's model gives the same
    routed = []
    for text in (DATES[0], UNITS[0]):
        expected = router.route(ref.model, ref.tokenizer, [text])[0]
        r = chat(live, "auto", text)
        assert r.adapter == expected and r.model == (expected or "tiny")
        assert r.choices[0].message.content == reference(ref, text, expected, 10)
        routed.append(r.adapter)
    assert routed == ["a", "b"]


def test_load_and_unload_adapters_at_run_time(live, ref, root):
    r = live.http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'c' added successfully."
    assert "c" in [m.id for m in live.client.models.list().data]
    assert chat(live, "c", PROMPTS[2]).choices[0].message.content == reference(ref, PROMPTS[2], "c", 10)
    again = live.http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    r = live.http.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 200 and "removed" in r.text
    assert "c" not in [m.id for m in live.client.models.list().data]
    assert live.http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
    # A request naming an adapter that exists under --adapters-dir loads it first (LoRAX style).
    assert chat(live, "c", PROMPTS[2]).choices[0].message.content == reference(ref, PROMPTS[2], "c", 10)
    assert live.http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200


def test_adapters_that_cannot_share_a_batch_are_refused(live, tiny_model_dir, root):
    from plugtune.serve.app import create_app

    err = error_of(live.http.post("/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": "dora"}), 400)
    assert "cannot be mixed per row" in err["message"] and "DoRA" in err["message"]
    assert "dora" not in [m.id for m in live.client.models.list().data]
    with pytest.raises(ValueError, match="cannot serve adapter 'dora'"):
        create_app(plugtune.load(str(tiny_model_dir), adapter={"dora": root / "dora"}))


def test_adapter_paths_stay_inside_the_allowed_directories(live, root):
    outside = str(root.parent / "outside" / "x")
    cases = {"../outside/x": "path traversal", outside: "outside the adapter directories",
             "escape": "outside the adapter directories", "nothing-here": "no adapter directory"}
    for path, words in cases.items():
        r = live.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text)
    bad_name = live.http.post("/v1/load_lora_adapter", json={"lora_name": "a.b", "lora_path": "c"})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "lora_name"
    (root / "c" / "sneaky.json").symlink_to(Path(outside) / "adapter_config.json")
    try:
        with pytest.raises(AdapterPathError, match="sneaky.json is a symlink"):
            resolve_adapter_dir("c", [root])
    finally:
        (root / "c" / "sneaky.json").unlink()
    with pytest.raises(AdapterPathError, match="--adapters-dir"):
        resolve_adapter_dir("c", [])
    with pytest.raises(openai.NotFoundError):  # not loaded on demand either: the symlink leaves the directory
        chat(live, "escape", PROMPTS[0])


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_bad_request_gets_an_openai_error(live):
    post = live.http.post
    good = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    err = error_of(post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and "parse the JSON" in err["message"]
    err = error_of(post("/v1/chat/completions", json={"model": "a"}), 400)
    assert err["param"] == "messages" and "Missing required parameter: 'messages'" in err["message"]
    assert error_of(post("/v1/chat/completions", json={**good, "messages": []}), 400)["param"] == "messages"
    err = error_of(post("/v1/chat/completions", json={**good, "model": "nope"}), 404)
    assert err["code"] == "model_not_found" and "Known models: tiny, a, b, auto" in err["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    err = error_of(httpx.post(live.url + "/v1/chat/completions", json=good), 401)
    assert "Authorization: Bearer" in err["message"]
    err = error_of(post("/v1/chat/completions", json={**good, "messages": [{"role": "user", "content": "hi " * 80}]}),
                   400)
    assert err["code"] == "context_length_exceeded" and "--max-prompt-tokens" in err["message"]
    err = error_of(post("/v1/chat/completions", json={**good, "max_tokens": 5000}), 400)
    assert err["param"] == "max_tokens" and "220" in err["message"]
    err = error_of(post("/v1/chat/completions", json={**good, "temperature": 7}), 400)
    assert err["param"] == "temperature"
    err = error_of(post("/v1/chat/completions", json={**good, "tools": [{"type": "function"}]}), 400)
    assert err["param"] == "tools" and "not supported" in err["message"]
    big = json.dumps({**good, "messages": [{"role": "user", "content": "x" * 30_000}]}).encode()
    assert error_of(post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}),
                    413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield big[:10_000]
        yield big[10_000:]
    assert error_of(post("/v1/chat/completions", content=chunked()), 413)["code"] == "request_too_large"
    assert error_of(post("/v1/completions", json={"model": "a", "prompt": [10**6]}), 400)["param"] == "prompt"
    assert error_of(live.http.get("/v1/nothing"), 404)["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="context length"):  # the client sees the same errors
        live.client.completions.create(model="a", prompt=[5] * 50, max_tokens=220)
    assert chat(live, "a", "still fine", max_tokens=2).choices[0].finish_reason == "length"


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def in_threads(fns):
    results = [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except Exception as exc:  # surfaced by the caller's assertions
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return threads, results


def test_requests_for_different_adapters_share_decode_steps(live, ref):
    engine = live.server.engine
    before = live.metrics()
    engine.pause()
    try:
        jobs = [lambda m=m: chat(live, m, PROMPTS[3], max_tokens=8, extra_body={"ignore_eos": True})
                for m in ("a", "b", "tiny")]
        threads, results = in_threads(jobs)
        wait_for(lambda: engine.num_waiting == 3)
    finally:
        engine.resume()
    for t in threads:
        t.join(30)
    for r, adapter in zip(results, ["a", "b", None]):
        assert r.choices[0].message.content == reference(ref, PROMPTS[3], adapter, 8)
        assert r.usage.completion_tokens == 8 and r.adapter == adapter
    after = live.metrics()
    steps = after["plugtune_decode_steps_total"] - before["plugtune_decode_steps_total"]
    rows = after["plugtune_decode_rows_total"] - before["plugtune_decode_rows_total"]
    assert after["plugtune_prefill_batches_total"] - before["plugtune_prefill_batches_total"] == 1
    assert (steps, rows) == (7, 21)  # every decode step carried all three adapters' rows
    assert after["plugtune_adapters_per_step_max"] >= 3


def test_concurrency_limit_answers_429(live):
    engine = live.server.engine
    engine.pause()
    try:
        threads, results = in_threads([lambda: chat(live, "a", "hi", max_tokens=2)] * 4)
        wait_for(lambda: live.server.in_flight == 4)
        err = error_of(live.http.post("/v1/chat/completions", json={
            "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}), 429)
        assert err["code"] == "rate_limit_exceeded" and "--max-concurrent" in err["message"]
    finally:
        engine.resume()
    for t in threads:
        t.join(30)
    assert all(r.choices[0].finish_reason == "length" for r in results)
    wait_for(lambda: live.server.in_flight == 0)


def test_client_disconnect_frees_its_slot(live):
    engine = live.server.engine
    before = live.metrics().get('plugtune_requests_finished_total{model="a",reason="abort"}', 0)
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        engine.pause()  # the request cannot finish on its own while we hang up
    try:
        wait_for(lambda: live.server.in_flight == 0)
    finally:
        engine.resume()
    wait_for(lambda: engine.num_running == 0)
    after = live.metrics()['plugtune_requests_finished_total{model="a",reason="abort"}']
    assert after == before + 1


def test_health_and_metrics(live):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # open, like vLLM's
    r = httpx.get(live.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE plugtune_generation_tokens_total counter" in r.text
    m = live.metrics()
    assert m['plugtune_generation_tokens_total{model="a"}'] > 0
    assert m["plugtune_num_requests_waiting"] == 0 and m["plugtune_num_requests_running"] == 0


def test_serve_command_loads_adapters_and_logs_the_url(tiny_model_dir, root, monkeypatch):
    import argparse

    from plugtune.serve.cli import add_serve_parser, build_app, startup_lines

    monkeypatch.setenv("PLUGTUNE_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tiny_model_dir), "--adapter", f"first={root / 'a'}",
                              "--adapter", str(root / "b"), "--adapters-dir", str(root), "--port", "8123"])
    app, settings, lm = build_app(args)
    assert settings.api_key == "from-env" and settings.adapter_dirs == (str(root),)
    assert app.state.server.adapters.keys() == {"first", "b"} and lm.active == []
    lines = startup_lines(args, settings, lm)
    assert lines[0] == f"plugtune serve: http://127.0.0.1:8123/v1 (OpenAI-compatible) - base model '{tiny_model_dir}'"
    assert lines[1] == f"  adapters: first (lora) from {root / 'a'}; b (lora) from {root / 'b'}"
    assert not any("WARNING" in line for line in lines)
    args = parser.parse_args(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--api-key", ""])
    app, settings, lm = build_app(args)
    assert "WARNING: listening on 0.0.0.0 without --api-key" in startup_lines(args, settings, lm)[-1]
