"""The UI's app: plugtune.serve's OpenAI-compatible app with the page's routes and files added.

    app = build_ui_app(plugtune.load("smollm2-135m"), ServeSettings(adapter_dirs=("runs",)),
                       UISettings(runs_dir=Path("runs"), data_dirs=(Path("data"),)))

/ui/            the page (static/index.html with this server's per-start token)
/ui/static/*    its script and style (shipped in the package: no CDN, no web fonts)
/ui/api/*       runs, training jobs, checkpoints, compare reports, exports, router scores
/v1/*           the server's own endpoints, which the page uses for chat and adapter loading
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from plugtune.serve.app import create_app, read_body
from plugtune.serve.protocol import APIError
from plugtune.serve.server import ServeSettings
from plugtune.ui import jobs, runs
from plugtune.ui.forms import RUN_NAME, FormErrors, check_train_form, form_fields, write_config
from plugtune.ui.paths import UIPathError, confine
from plugtune.ui.security import PageGuard, is_loopback

STATIC = Path(__file__).resolve().parent / "static"
FILE_TYPES = {".png": "image/png", ".json": "application/json", ".md": "text/plain", ".txt": "text/plain",
              ".yaml": "text/plain", ".jsonl": "text/plain", ".log": "text/plain"}
GGUF_QUANTS = ("f16", "f32", "q8_0", "q4_0")  # plugtune export --quant
EXPORTS = "exports"  # <runs>/exports/<name>: merged models made from the page


@dataclass(frozen=True)
class UISettings:
    runs_dir: Path = Path("runs")  # every run the page lists, starts, resumes; exports go here too
    data_dirs: tuple[Path, ...] = ()  # training data the form may name (default: the working directory)
    host: str = "127.0.0.1"
    model: str = ""  # the served base (the form's default base model)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))


def build_ui_app(lm, settings: ServeSettings, ui: UISettings) -> FastAPI:
    """create_app(lm, settings) with the page added. Listening beyond loopback needs the API key."""
    if not is_loopback(ui.host) and not settings.api_key:
        raise ValueError(f"plugtune ui listens on {ui.host}, beyond this machine: set --api-key (or "
                         "$PLUGTUNE_API_KEY), or keep the default --host 127.0.0.1")
    ui.runs_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(lm, settings)
    app.include_router(_routes(app, settings, ui))
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(PageGuard, loopback_only=is_loopback(ui.host), token=ui.token, api_key=settings.api_key)
    return app


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


def _error(status: int, message: str, param: str | None = None) -> APIError:
    return APIError(status, " ".join(message.split()), param=param)


def _job(action, *args):
    """jobs.start/jobs.stop, with their refusal (a job already running, none to stop) as a 409 for the page."""
    try:
        return action(*args)
    except RuntimeError as exc:
        raise _error(409, str(exc)) from None


def _routes(app: FastAPI, settings: ServeSettings, ui: UISettings) -> APIRouter:
    routes = APIRouter()
    server = app.state.server
    runs_dir = Path(os.path.realpath(ui.runs_dir))
    data_dirs = [Path(os.path.realpath(d)) for d in (ui.data_dirs or (Path.cwd(),))]
    adapter_roots = list(dict.fromkeys([runs_dir, *[Path(os.path.realpath(d)) for d in settings.adapter_dirs]]))

    async def body(request: Request) -> dict:
        return (await read_body(request, _Body, settings.max_body_bytes)).model_dump()

    def run_path(name) -> Path:
        if not isinstance(name, str):
            raise _error(400, "give the run's name (its path under the runs directory)", "name")
        try:
            path = confine(name, [runs_dir], "run")
        except UIPathError as exc:
            raise _error(400, str(exc), "name") from None
        if not path.is_dir() or not runs.is_run(path):
            raise _error(404, f"no run '{name}' under {runs_dir}", "name")
        return path

    @routes.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/")

    @routes.get("/ui", include_in_schema=False)
    @routes.get("/ui/", include_in_schema=False)
    async def page():
        html = (STATIC / "index.html").read_text().replace("{{TOKEN}}", ui.token)
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                                      "frame-ancestors 'none'"})

    @routes.get("/ui/api/info")
    async def info():
        return {"base": server.base, "model": ui.model or server.base, "runs_dir": str(runs_dir),
                "data_dirs": [str(d) for d in data_dirs], "adapter_dirs": [str(d) for d in adapter_roots],
                "router": server.lm.router is not None, "api_key_required": bool(settings.api_key),
                "gguf": importlib.util.find_spec("plugtune.export") is not None}

    @routes.get("/ui/api/form")
    async def form():
        return {"fields": form_fields(ui.model or str(server.lm.path)), "data_files": _data_files(data_dirs)}

    @routes.post("/ui/api/train")
    async def start_train(request: Request):
        values = await body(request)
        try:
            req = check_train_form(values, runs_dir, data_dirs)
        except FormErrors as exc:
            return JSONResponse({"error": {"message": "the form has errors: " + str(exc), "type":
                                           "invalid_request_error", "param": next(iter(exc.fields)), "code": None},
                                 "fields": exc.fields}, status_code=400)
        job_dir = req.run_dir / runs.UI_DIR
        config = write_config(job_dir / "config.yaml", req.config)
        _job(jobs.start, "train", job_dir, [str(config)])
        return {"run": req.name, "state": "starting"}

    @routes.get("/ui/api/runs")
    async def list_runs():
        return {"runs": [runs.summary(r, runs_dir) for r in runs.find_runs(runs_dir)]}

    @routes.get("/ui/api/run")
    async def get_run(name: str):
        return runs.detail(run_path(name), runs_dir)

    @routes.post("/ui/api/run/stop")
    async def stop_run(request: Request):
        run = run_path((await body(request)).get("name"))
        _job(jobs.stop, run / runs.UI_DIR)
        return {"run": run.name, "state": "stopping"}

    @routes.post("/ui/api/run/resume")
    async def resume_run(request: Request):
        values = await body(request)
        run = run_path(values.get("name"))
        steps = values.get("more_steps")
        config = _run_config(run)
        overrides = [f"output.dir={run}"]
        if steps not in (None, "", 0):
            try:
                steps = int(steps)
                if steps < 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise _error(400, f"more steps must be a whole number >= 1, got {steps!r}", "more_steps") from None
            checkpoints = runs.checkpoints_of(run)
            if not checkpoints:
                raise _error(409, "this run has no checkpoint to continue from: resume it instead (it starts "
                                  "again from step 0)", "more_steps")
            last = checkpoints[-1]
            total = int(last["step"]) + steps
            config.setdefault("training", {})["max_steps"] = total
            overrides.append(f"output.resume={run / 'checkpoints' / last['name']}")
        else:
            overrides.append("output.resume=auto")
        config.setdefault("output", {})["dir"] = str(run)
        path = write_config(run / runs.UI_DIR / "config.yaml", config)
        _job(jobs.start, "train", run / runs.UI_DIR, [str(path), *overrides])
        return {"run": run.name, "state": "starting"}

    @routes.post("/ui/api/run/checkpoint_adapter")
    async def checkpoint_adapter(request: Request):
        """Save checkpoint step-N of a run as an adapter (a background job); the page then loads it."""
        values = await body(request)
        run = run_path(values.get("name"))
        names = {c["name"]: c for c in runs.checkpoints_of(run)}
        if values.get("checkpoint") not in names:
            raise _error(404, f"no checkpoint {values.get('checkpoint')!r} in {run.name} (have: "
                              f"{', '.join(names) or 'none'})", "checkpoint")
        name = values["checkpoint"]
        out = run / "checkpoint_adapters" / name
        config = run / "config.yaml"
        if not config.is_file():
            raise _error(409, f"{run.name} has no config.yaml to rebuild its adapter from")
        job_dir = run / "checkpoint_adapters" / ".jobs" / name
        _job(jobs.start, "checkpoint", job_dir, [str(config), str(run / "checkpoints" / name), str(out)])
        return {"job": str(job_dir.relative_to(runs_dir)), "out": str(out)}

    @routes.get("/ui/api/job")
    async def job_state(dir: str):
        try:
            path = confine(dir, [runs_dir], "job")
        except UIPathError as exc:
            raise _error(400, str(exc), "dir") from None
        state = jobs.status(path)
        if state is None:
            raise _error(404, f"no job in {dir}", "dir")
        return {**state, "log": jobs.log_tail(path, 3000)}

    @routes.get("/ui/api/file")
    async def get_file(path: str):
        try:
            real = confine(path, [runs_dir], "file")
        except UIPathError as exc:
            raise _error(400, str(exc), "path") from None
        if not real.is_file() or real.suffix not in FILE_TYPES:
            raise _error(404, f"no file {path!r} the page can show (types: {', '.join(FILE_TYPES)})", "path")
        return FileResponse(real, media_type=FILE_TYPES[real.suffix])

    @routes.get("/ui/api/adapters")
    async def list_adapters():
        return {"adapters": runs.find_adapters(adapter_roots),
                "loaded": {n: e["path"] for n, e in server.adapters.items()}}

    @routes.post("/ui/api/route")
    async def route(request: Request):
        """The router's scores for a conversation: which adapter `auto` picks, and how sure it is."""
        messages = (await body(request)).get("messages")
        router, lm = server.lm.router, server.lm
        if router is None:
            raise _error(400, "no router loaded: start the UI with --router DIR to use 'auto'", "model")
        if not isinstance(messages, list) or not messages:
            raise _error(400, "messages must be a non-empty list", "messages")
        tok = server.engine.tokenizer
        scores = await server.on_engine(lambda: router.scores(lm.model, tok, [messages]))
        picked = router.decide(scores)[0]
        return {"adapter": picked, "threshold": float(router.threshold),
                "scores": {n: round(float(s), 4) for n, s in zip(router.adapters, scores[0])}}

    @routes.get("/ui/api/compare")
    async def compare_list():
        return {"reports": runs.compare_reports(runs_dir)}

    @routes.get("/ui/api/compare/report")
    async def compare_report(dir: str):
        try:
            path = confine(dir, [runs_dir], "report directory")
            return {"dir": dir, **runs.compare_report(path)}
        except UIPathError as exc:
            raise _error(400, str(exc), "dir") from None
        except FileNotFoundError as exc:
            raise _error(404, str(exc), "dir") from None

    @routes.post("/ui/api/export")
    async def export(request: Request):
        values = await body(request)
        kind, name = values.get("kind", "merge"), str(values.get("name", ""))
        if kind not in ("merge", "gguf"):
            raise _error(400, f"unknown export kind {kind!r} (merge or gguf)", "kind")
        quant = str(values.get("quant") or "f16")
        if quant not in GGUF_QUANTS:
            raise _error(400, f"quant {quant!r} is not one of {', '.join(GGUF_QUANTS)}", "quant")
        if kind == "gguf" and importlib.util.find_spec("plugtune.export") is None:
            raise _error(400, "GGUF export needs plugtune.export, which this version does not have yet", "kind")
        from_runs = runs.find_adapters(adapter_roots)
        adapter = str(values.get("adapter", ""))
        if adapter not in {a["path"] for a in from_runs}:
            raise _error(400, f"adapter {adapter!r} is not an adapter directory under the runs or adapter "
                              "directories", "adapter")
        if not RUN_NAME.match(name):
            raise _error(400, "give the export a name: 1-64 letters, digits, '_', '-' or '.'", "name")
        job_dir = runs_dir / EXPORTS / name
        out = job_dir / ("model" if kind == "merge" else f"{name}-{quant}.gguf")
        if job_dir.exists():
            raise _error(409, f"an export named '{name}' exists already ({out}): pick another name", "name")
        if shutil.disk_usage(runs_dir).free < 2**20:
            raise _error(507, f"no free space under {runs_dir}")
        base = str(values.get("model") or server.lm.path)
        _job(jobs.start, kind, job_dir, [base, adapter, str(out)] + ([quant] if kind == "gguf" else []))
        return {"export": name, "job": f"{EXPORTS}/{name}"}

    @routes.get("/ui/api/exports")
    async def exports():
        out = []
        for d in sorted((runs_dir / EXPORTS).glob("*")):
            state = jobs.status(d)
            if state is not None:
                outputs = [str(p) for p in sorted(d.iterdir()) if p.name == "model" or p.suffix == ".gguf"]
                out.append({"name": d.name, "job": f"{EXPORTS}/{d.name}", "out": ", ".join(outputs) or "(not yet)",
                            **state})
        return {"exports": out}

    return routes


def _run_config(run: Path) -> dict:
    """The config a run was started with (the page's copy, else the run's config.yaml)."""
    for cand in (run / runs.UI_DIR / "config.yaml", run / "config.yaml"):
        if cand.is_file():
            data = yaml.safe_load(cand.read_text())
            if isinstance(data, dict):
                return data
    raise _error(409, f"{run} has no config.yaml to resume it with")


def _data_files(roots: list[Path], limit: int = 200) -> list[str]:
    """JSON/JSONL files in the data directories (depth 3), for the form's suggestions."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath[len(str(root)):].count(os.sep) >= 3:
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules", "checkpoints")]
            found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                      if f.endswith((".jsonl", ".json")) and not f.startswith(".")]
            if len(found) >= limit:
                return found[:limit]
    return found
