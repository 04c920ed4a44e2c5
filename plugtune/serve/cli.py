"""`plugtune serve` and `plugtune adapters check --for vllm`, as argparse parsers the main CLI
mounts (add_serve_parser, add_check_parser). `python -m plugtune.serve ...` runs `serve` alone.

    plugtune serve --model smollm2-135m --adapter dates=runs/dates/adapter --adapter units=runs/units/adapter \\
                   --adapters-dir runs --router runs/router --port 8000
"""
from __future__ import annotations

import argparse
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _adapter_arg(text: str) -> tuple[str, str]:
    """NAME=DIR (vLLM's --lora-modules form) or DIR (named after its last component)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = os.path.basename(os.path.normpath(text))
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server: many adapters on one base, "
                                            "continuous batching across them")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    p.add_argument("--served-model-name", default=None, help="the base's id in /v1/models (default: --model)")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="adapter to load at start-up (repeatable)")
    p.add_argument("--adapters-dir", action="append", default=[], metavar="DIR",
                   help="allow run-time loading (POST /v1/load_lora_adapter, or a request naming <DIR>/<name>) "
                        "from inside DIR only (repeatable)")
    p.add_argument("--router", default=None, help="saved router directory: enables model='auto'")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PLUGTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PLUGTUNE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=64, help="generation requests in flight; more get 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default="none", metavar="none|int8|int4|nf4",
                   help="serve on a base whose linear weights are stored in 8 or 4 bits (nf4: CUDA + bitsandbytes)")
    p.add_argument("--force", action="store_true", help="load adapters made for another base")
    p.add_argument("--log-level", default="info")


def build_app(args):
    """Load the model and adapters named by `args`; return (app, settings, lm)."""
    import torch

    from plugtune.api import load
    from plugtune.serve.app import ServeSettings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("two --adapter options use the same name")
    for d in args.adapters_dir:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--adapters-dir {d} is not a directory")
    settings = ServeSettings(api_key=args.api_key or None, adapter_dirs=tuple(args.adapters_dir),
                             max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                             max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                             max_body_bytes=args.max_body_bytes, served_model_name=args.served_model_name)
    lm = load(args.model, adapter=adapters, dtype=args.dtype, device=args.device, force=args.force,
              router=args.router, quantize=args.quantize)
    return create_app(lm, settings), settings, lm


def startup_lines(args, settings, lm) -> list[str]:
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = settings.served_model_name or lm.name
    lines = [f"plugtune serve: http://{host}:{args.port}/v1 (OpenAI-compatible) - base model '{base}'"]
    infos = lm.info()
    if infos:
        lines.append("  adapters: " + "; ".join(f"{i.name} ({i.method}) from {i.path}" for i in infos))
    else:
        lines.append("  adapters: none loaded")
    lines.append(f"  run-time loading from: {', '.join(settings.adapter_dirs) or 'off (no --adapters-dir)'}")
    lines.append(f"  router ('auto'): {args.router or 'none'}")
    if getattr(args, "quantize", "none") != "none":
        lines.append(f"  base weights: {args.quantize} (quantized; adapters in fp32)")
    lines.append(f"  api key: {'required' if settings.api_key else 'none'}; max batch {settings.max_batch}, "
                 f"max concurrent {settings.max_concurrent}, max prompt tokens {settings.max_prompt_tokens}, "
                 f"max tokens {settings.max_tokens}")
    if args.host not in LOOPBACK and not settings.api_key:
        lines.append(f"  WARNING: listening on {args.host} without --api-key: anyone who can reach this port "
                     "can use the server")
    return lines


def cmd_serve(args) -> None:
    import uvicorn

    app, settings, lm = build_app(args)
    for line in startup_lines(args, settings, lm):
        print(line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_check_parser(adapters_subparsers) -> argparse.ArgumentParser:
    p = adapters_subparsers.add_parser("check", help="check that adapters can be served elsewhere (vLLM)")
    p.add_argument("--for", dest="target", choices=["vllm"], required=True, help="the server to check for")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the --max-lora-rank you will give vLLM (default: say which one is needed)")
    p.add_argument("dir", help="an adapter directory, or a directory of adapter directories")
    p.set_defaults(func=cmd_adapters_check)
    return p


def cmd_adapters_check(args) -> None:
    from plugtune.adapters.vllm_check import check_for_vllm

    checks, report = check_for_vllm(args.dir, args.max_lora_rank)
    print(report)
    if not all(c.ok for c in checks):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugtune.serve", description=__doc__.splitlines()[0])
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        cmd_serve(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"plugtune serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
