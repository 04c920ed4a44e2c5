"""Gradio against FastAPI + plugtune's hand-written page: what the `plugtune ui` toolkit choice rests on.

    python -m venv /tmp/venv-gradio && /tmp/venv-gradio/bin/pip install gradio
    python -m venv /tmp/venv-fastapi && /tmp/venv-fastapi/bin/pip install fastapi uvicorn
    flock /tmp/plugtune-cpu.lock python bench/ui_toolkit.py --gradio-python /tmp/venv-gradio/bin/python \\
        --fastapi-python /tmp/venv-fastapi/bin/python

Each toolkit serves the same stand-in chat: a reply streamed word by word (no model, so only the
toolkit is measured). Gradio: gr.ChatInterface with a generator. FastAPI: plugtune/ui/static served
as files and an SSE endpoint. Measured, alternating the two, median of --repeats:
  - dependency weight: packages and MB in a fresh venv (pip and setuptools left out);
  - import time of the toolkit, and start-up time from process start to the first HTTP 200;
  - the page in headless Chromium (Debian's): time until its text box is visible, requests, bytes,
    and requests to hosts other than the server (CDNs, fonts: they fail offline).
Prints a table and writes bench/results/ui_toolkit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "plugtune" / "ui" / "static"

GRADIO_APP = """
import sys, gradio as gr
def reply(message, history):
    out = ""
    for word in message.split():
        out += word + " "
        yield out
gr.ChatInterface(reply).launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""

FASTAPI_APP = """
import json, sys
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
static = sys.argv[2]
app = FastAPI()
@app.get("/ui/")
async def page():
    return HTMLResponse(open(static + "/index.html").read().replace("{{TOKEN}}", "x"))
@app.post("/v1/chat/completions")
async def chat(request: Request):
    words = (await request.json())["messages"][-1]["content"].split()
    async def events():
        for w in words:
            yield "data: " + json.dumps({"choices": [{"delta": {"content": w + " "}}]}) + "\\n\\n"
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")
app.mount("/ui/static", StaticFiles(directory=static))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_packages(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def weight(python: str) -> dict:
    sp = site_packages(python)
    skip = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
    dists = [d for d in sp.glob("*.dist-info") if not d.name.startswith(("pip-", "setuptools-"))]
    size = 0
    for entry in sp.iterdir():
        if entry.name.startswith(skip) or entry.name.startswith(("pip-", "setuptools-")):
            continue
        if entry.is_dir():
            size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        else:
            size += entry.stat().st_size
    return {"packages": len(dists), "mb": round(size / 2**20, 1)}


def import_seconds(python: str, modules: str) -> float:
    t = time.perf_counter()
    subprocess.run([python, "-c", f"import {modules}"], check=True, capture_output=True)
    return time.perf_counter() - t


def start_server(python: str, code: str, port: int, path: str, log: Path) -> tuple[subprocess.Popen, float]:
    script = log.with_name(f"app_{log.stem.replace('+', '_')}.py")  # not gradio.py: it would shadow gradio
    script.write_text(code)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([python, str(script), str(port), str(STATIC)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while True:
        try:
            with urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t
        except OSError:
            pass
        if proc.poll() is not None or time.perf_counter() - t > 120:
            raise RuntimeError(f"{script} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def page_load(browser, url: str, textbox: str) -> dict:
    page = browser.new_page()
    requests, sizes = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfinished", lambda r: sizes.append(r.sizes()["responseBodySize"]))
    t = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.wait_for_selector(textbox, state="visible", timeout=60_000)
    seconds = time.perf_counter() - t
    page.wait_for_timeout(1500)  # late requests (fonts, analytics)
    external = sorted({u.split("/")[2] for u in requests if u.startswith("http") and "127.0.0.1" not in u})
    page.close()
    return {"visible_s": seconds, "requests": len(requests), "kb": round(sum(sizes) / 1024, 1), "external_hosts": external}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gradio-python", required=True)
    ap.add_argument("--fastapi-python", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    kits = {"gradio": (args.gradio_python, "gradio", GRADIO_APP, "/", "textarea"),
            "fastapi+page": (args.fastapi_python, "fastapi, uvicorn", FASTAPI_APP, "/ui/", "#chat-input")}
    results = {k: {**weight(v[0]), "import_s": [], "startup_s": [], "page": []} for k, v in kits.items()}
    results["fastapi+page"]["page_assets_kb"] = round(sum(f.stat().st_size for f in STATIC.iterdir()) / 1024, 1)
    tmp = Path(tempfile.mkdtemp())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        for _ in range(args.repeats):
            for name, (python, modules, code, path, textbox) in kits.items():  # alternating
                results[name]["import_s"].append(import_seconds(python, modules))
                port = free_port()
                proc, startup = start_server(python, code, port, path, tmp / f"{name}.log")
                try:
                    results[name]["startup_s"].append(startup)
                    results[name]["page"].append(page_load(browser, f"http://127.0.0.1:{port}{path}", textbox))
                finally:
                    os.killpg(proc.pid, 15)
                    proc.wait(30)
        browser.close()
    table = ["| toolkit | packages | MB installed | import s | start-up s (to first 200) | page visible s | "
             "requests | KB loaded | other hosts asked |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        med = lambda xs: round(statistics.median(xs), 2)
        pages = r["page"]
        r["summary"] = {"import_s": med(r["import_s"]), "startup_s": med(r["startup_s"]),
                        "visible_s": med([x["visible_s"] for x in pages]),
                        "requests": med([x["requests"] for x in pages]), "kb": med([x["kb"] for x in pages]),
                        "external_hosts": sorted({h for x in pages for h in x["external_hosts"]})}
        s = r["summary"]
        table.append(f"| {name} | {r['packages']} | {r['mb']} | {s['import_s']} | {s['startup_s']} | {s['visible_s']} | "
                     f"{s['requests']} | {s['kb']} | {', '.join(s['external_hosts']) or 'none'} |")
    print("\n".join(table))
    out = ROOT / "bench" / "results" / "ui_toolkit.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "repeats": args.repeats, "results": results}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
