"""`plugtune ui`: the web page and the OpenAI-compatible API on one port (loopback by default).

    plugtune ui --model smollm2-135m --runs-dir runs --data-dir data --port 8000
    # open http://127.0.0.1:8000/ui/

It takes `plugtune serve`'s options (plugtune.serve.cli.add_serve_args), plus the runs directory (every
run listed, new runs and exports written there; also allowed for adapter loading) and the data
directories the Train form may read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from plugtune.serve.cli import add_serve_args


def add_ui_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ui", help="local web page: train, watch runs, compare, chat (side by side), export; "
                                         "serves the OpenAI-compatible API on the same port")
    add_serve_args(p)
    p.add_argument("--runs-dir", default="runs", help="runs are listed from, started in and exported to this directory")
    p.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                   help="the Train form may read data files from DIR (repeatable; default: the current directory)")
    p.set_defaults(func=cmd_ui)
    return p


def build(args):
    """(app, serve settings, ui settings, lm) from parsed arguments."""
    import torch

    from plugtune.api import load
    from plugtune.serve.server import ServeSettings
    from plugtune.ui.app import UISettings, build_ui_app

    if args.threads:
        torch.set_num_threads(args.threads)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for d in [*args.adapters_dir, *args.data_dir]:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} is not a directory")
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("two --adapter options use the same name")
    settings = ServeSettings(api_key=args.api_key or None, adapter_dirs=(str(runs_dir), *args.adapters_dir),
                             max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                             max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                             max_body_bytes=args.max_body_bytes, served_model_name=args.served_model_name)
    ui = UISettings(runs_dir=runs_dir, data_dirs=tuple(Path(d) for d in args.data_dir), host=args.host,
                    model=args.model)
    if not ui.host.startswith("127.") and ui.host not in ("localhost", "::1") and not settings.api_key:
        raise ValueError(f"--host {args.host} listens beyond this machine: set --api-key (or $PLUGTUNE_API_KEY)")
    lm = load(args.model, adapter=adapters, dtype=args.dtype, device=args.device, force=args.force,
              router=args.router, quantize=args.quantize)
    return build_ui_app(lm, settings, ui), settings, ui, lm


def cmd_ui(args) -> None:
    import uvicorn

    app, settings, ui, lm = build(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"plugtune ui: http://{host}:{args.port}/ui/  (API: http://{host}:{args.port}/v1) - base '{lm.name}', "
          f"runs in {ui.runs_dir}, data from {', '.join(map(str, ui.data_dirs)) or os.getcwd()}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
