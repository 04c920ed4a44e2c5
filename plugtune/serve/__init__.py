"""plugtune serve: an OpenAI-compatible server for many adapters on one base, with continuous
batching across adapters. `engine` has no HTTP in it; `app` is the FastAPI layer (needs the
`serve` extra: fastapi + uvicorn)."""
from plugtune.serve.engine import Completion, Engine, Event, Handle, Request

__all__ = ["Completion", "Engine", "Event", "Handle", "Request"]
