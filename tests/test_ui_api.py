"""plugtune ui without a browser: the guard against other sites and other hosts, the API key beyond
loopback, paths confined to the runs and data directories (traversal and symlinks out refused), the
Train form's errors placed beside their fields, and background jobs read back from their files."""
import json
import os
import sys
import time

import pytest

import plugtune
from plugtune.ui.forms import FormErrors, check_train_form
from plugtune.ui.paths import UIPathError, confine

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from plugtune.serve.server import ServeSettings  # noqa: E402
from plugtune.ui import jobs  # noqa: E402
from plugtune.ui.app import UISettings, build_ui_app  # noqa: E402

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    top = tmp_path_factory.mktemp("uiapi")
    (top / "runs" / "r1").mkdir(parents=True)
    (top / "runs" / "r1" / "config.yaml").write_text("training:\n  max_steps: 3\n")
    (top / "runs" / "r1" / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "loss": 1.5}\n{"kind": "tr')
    (top / "data").mkdir()
    (top / "data" / "train.jsonl").write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n")
    (top / "secret").mkdir()
    (top / "secret" / "key.json").write_text("{}")
    (top / "secret" / "x.jsonl").write_text("{}\n")
    os.symlink(top / "secret", top / "runs" / "escape")
    os.symlink(top / "secret", top / "data" / "escape")
    return top


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return plugtune.load(str(tiny_model_dir))


def client(lm, dirs, host="127.0.0.1", api_key=None):
    app = build_ui_app(lm, ServeSettings(api_key=api_key, adapter_dirs=(str(dirs / "runs"),)),
                       UISettings(runs_dir=dirs / "runs", data_dirs=(dirs / "data",), host=host, token=TOKEN))
    return TestClient(app, base_url="http://127.0.0.1:8000")


SAME = {"X-Plugtune-Token": TOKEN, "Origin": "http://127.0.0.1:8000"}


def test_the_page_carries_its_token_and_is_not_framed(lm, dirs):
    with client(lm, dirs) as c:
        r = c.get("/ui/")
        assert r.status_code == 200 and f'content="{TOKEN}"' in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert c.get("/ui/static/app.js").status_code == 200
        page = r.text + c.get("/ui/static/app.js").text + c.get("/ui/static/style.css").text
        assert "http://" not in page.replace("http://127.0.0.1", "") and "https://" not in page  # no CDN, no fonts


def test_cross_site_requests_are_refused(lm, dirs):
    with client(lm, dirs) as c:
        body = {"name": "x"}
        assert c.post("/ui/api/train", json=body).status_code == 403  # no token
        assert c.post("/ui/api/train", json=body, headers={**SAME, "X-Plugtune-Token": "wrong"}).status_code == 403
        r = c.post("/ui/api/train", json=body, headers={**SAME, "Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
        # the server's own endpoints too: a page elsewhere cannot load adapters or spend the model's time
        r = c.post("/v1/load_lora_adapter", content='{"lora_name": "x", "lora_path": "r1"}',
                   headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert r.status_code == 403
        assert c.post("/v1/chat/completions", json={}, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        # DNS rebinding: another name pointed at 127.0.0.1
        assert c.get("/ui/api/runs", headers={"Host": "evil.example:8000"}).status_code == 403
        assert c.get("/ui/api/runs", headers={"Host": "localhost:8000"}).status_code == 200
        # the same page with its token: accepted (here a form error, not a refusal)
        r = c.post("/ui/api/train", json={"name": ""}, headers=SAME)
        assert r.status_code == 400 and "name" in r.json()["fields"]


def test_beyond_loopback_needs_the_api_key(lm, dirs):
    with pytest.raises(ValueError, match="api-key"):
        client(lm, dirs, host="0.0.0.0")
    with client(lm, dirs, host="0.0.0.0", api_key="sk-1") as c:
        assert c.get("/ui/api/info").status_code == 401
        assert c.get("/v1/models").status_code == 401
        r = c.get("/ui/api/info", headers={"Authorization": "Bearer sk-1"})
        assert r.status_code == 200 and r.json()["api_key_required"] is True


def test_paths_stay_inside_the_runs_and_data_directories(lm, dirs):
    with client(lm, dirs) as c:
        for path in ("../secret/key.json", "/etc/passwd", "escape/key.json", str(dirs / "secret" / "key.json")):
            r = c.get("/ui/api/file", params={"path": path})
            assert r.status_code == 400, path
        assert "symlinks may not leave" in c.get("/ui/api/file", params={"path": "escape/key.json"}).json()["error"]["message"]
        assert c.get("/ui/api/run", params={"name": "escape"}).status_code == 400
        assert c.get("/ui/api/run", params={"name": "../secret"}).status_code == 400
        assert c.get("/ui/api/file", params={"path": "r1/config.yaml"}).text.startswith("training:")
        assert c.get("/ui/api/compare/report", params={"dir": "../secret"}).status_code == 400
        names = [r["name"] for r in c.get("/ui/api/runs").json()["runs"]]
        assert names == ["r1"]  # the symlinked directory is not walked into
        run = c.get("/ui/api/run", params={"name": "r1"}).json()
        assert [m["step"] for m in run["metrics"]] == [1, 2]  # a torn last line is skipped
        r = c.post("/ui/api/export", json={"adapter": str(dirs / "secret"), "name": "m"}, headers=SAME)
        assert r.status_code == 400


@pytest.mark.parametrize("values, field, words", [
    ({"training.lr": "-1"}, "training.lr", "must be > 0"),
    ({"training.max_steps": "abc"}, "training.max_steps", "expected an integer"),
    ({"adapter.r": "x"}, "adapter.r", "expected an integer"),
    ({"method": "zzz"}, "method", "unknown method"),
    ({"objective": "q"}, "objective", "not one of"),
    ({"overrides": "adapter.bogus=1"}, "overrides", "unknown key 'bogus'"),
    ({"overrides": "output.dir=/tmp"}, "overrides", "set by the page"),
    ({"data.train": "../secret/x.jsonl"}, "data.train", "traversal"),
    ({"data.train": "escape/x.jsonl"}, "data.train", "symlinks may not leave"),
    ({"data.train": "missing.jsonl"}, "data.train", "no such file"),
    ({"name": "../up"}, "name", "give the run a name"),
    ({"name": "r1"}, "name", "exists already"),
])
def test_form_errors_are_put_beside_their_field(dirs, values, field, words):
    form = {"name": "new", "data.train": "train.jsonl", "training.max_steps": "2", **values}
    with pytest.raises(FormErrors) as err:
        check_train_form(form, dirs / "runs", [dirs / "data"])
    assert list(err.value.fields) == [field] and words in err.value.fields[field]


def test_a_good_form_gives_the_clis_config(dirs, tiny_model_dir):
    from plugtune.config import RunConfig, from_dict, load_run_config, to_dict

    req = check_train_form({"name": "ok", "model.name": str(tiny_model_dir), "data.train": "train.jsonl",
                            "training.max_steps": "2", "adapter.r": "4", "overrides": "training.warmup_steps=1"},
                           dirs / "runs", [dirs / "data"])
    cli = load_run_config("lora_sft", [f"model.name={tiny_model_dir}", f"data.train={dirs / 'data' / 'train.jsonl'}",
                                       "training.max_steps=2", "adapter.r=4", "training.warmup_steps=1",
                                       f"output.dir={dirs / 'runs' / 'ok'}", "method=lora"])
    assert to_dict(from_dict(RunConfig, req.config)) == to_dict(cli)
    assert not (dirs / "runs" / "ok").exists()  # checking writes nothing


def test_confine_refuses_traversal_and_symlinks(dirs):
    root = dirs / "runs"
    assert confine("r1", [root]) == (root / "r1").resolve()
    assert confine("new/dir", [root]) == (root / "new" / "dir").resolve()
    for bad in ("../secret", "escape", "escape/key.json", "/etc", "", "a\x00b"):
        with pytest.raises(UIPathError):
            confine(bad, [root])


def test_a_job_is_read_back_from_its_files(tmp_path):
    """A job that fails says why; one killed without a word reads as died; a stopped one as stopped."""
    failed = tmp_path / "failed"
    jobs.start("checkpoint", failed, [str(tmp_path / "no.yaml"), str(tmp_path / "no"), str(tmp_path / "out")])
    deadline = time.time() + 60
    while jobs.status(failed)["state"] in ("starting", "running"):
        assert time.time() < deadline
        time.sleep(0.2)
    st = jobs.status(failed)
    assert st["state"] == "failed" and "no.yaml" in st["error"], (st, jobs.log_tail(failed))
    assert "Traceback" in jobs.log_tail(failed)

    gone = tmp_path / "gone"
    launch = jobs.start("checkpoint", gone, ["x", "y", "z"])
    os.kill(launch["pid"], 9)
    deadline = time.time() + 30  # SIGKILL waits for a process in uninterruptible sleep (disk reads under load)
    while jobs.status(gone)["alive"]:
        assert time.time() < deadline
        time.sleep(0.1)
    st = jobs.status(gone)
    assert st["state"] == "died" and "log.txt" in st["error"] and not st["alive"], (st, jobs.log_tail(gone))

    stopped = tmp_path / "stopped"
    jobs.start("checkpoint", stopped, ["x", "y", "z"])
    jobs.stop(stopped)
    deadline = time.time() + 30
    while jobs.status(stopped)["alive"]:
        assert time.time() < deadline
        time.sleep(0.1)
    assert jobs.status(stopped)["state"] == "stopped", (jobs.status(stopped), jobs.log_tail(stopped))
    with pytest.raises(RuntimeError, match="no running job"):
        jobs.stop(stopped)
    assert sys.executable in jobs.status(stopped)["command"]


def test_auto_shows_the_routers_pick_and_scores(tiny_model_dir, tmp_path, dirs):
    """POST /ui/api/route: the adapter `auto` picks and every adapter's score, as the server routes."""
    import torch

    from plugtune.adapters import adapter_state, attach_adapter, save_adapter
    from plugtune.inference.router import fit_router

    for seed, name in enumerate("ab", start=1):
        lm = plugtune.load(str(tiny_model_dir))
        attach_adapter(lm.model, "lora", {"r": 4}, name=name)
        with torch.no_grad():
            for p in adapter_state(lm.model, name).values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        save_adapter(lm.model, tmp_path / name, name)
    lm = plugtune.load(str(tiny_model_dir), adapter={"a": tmp_path / "a", "b": tmp_path / "b"})
    prompts = {"a": ["convert the date March 5", "date of May 1 please", "what date is June 7"],
               "b": ["convert 3 km to m", "how many g in 5 kg", "7 m in cm"]}
    lm.router = fit_router(lm.model, lm.tokenizer, prompts, kind="hidden", shipped=False,
                           negatives=["hello there", "tell me a joke"])
    with client(lm, dirs) as c:
        for text in ("convert the date March 5", "convert 3 km to m"):
            messages = [{"role": "user", "content": text}]
            r = c.post("/ui/api/route", json={"messages": messages}, headers=SAME).json()
            assert set(r["scores"]) == {"a", "b"} and all(0 <= s <= 1 for s in r["scores"].values())
            best = max(r["scores"], key=r["scores"].get)
            assert r["adapter"] == (best if r["scores"][best] > r["threshold"] else None)
            answer = c.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "max_tokens": 2}).json()
            assert answer["choices"][0]["adapter"] == r["adapter"]  # the server routed the same way
        assert c.post("/ui/api/route", json={"messages": []}, headers=SAME).status_code == 400


def test_export_refuses_what_it_cannot_do(lm, dirs):
    with client(lm, dirs) as c:
        adapters = c.get("/ui/api/adapters").json()["adapters"]
        assert adapters == []  # none under the runs directory here
        for body, param in (({"kind": "zip", "adapter": "x", "name": "m"}, "kind"),
                            ({"kind": "gguf", "quant": "q2_k", "adapter": "x", "name": "m"}, "quant"),
                            ({"kind": "merge", "adapter": "/etc", "name": "m"}, "adapter")):
            r = c.post("/ui/api/export", json=body, headers=SAME)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
        assert c.get("/ui/api/exports").json() == {"exports": []}
