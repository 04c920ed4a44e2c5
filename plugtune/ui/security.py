"""Guarding the page against other web pages and other machines (pure ASGI middleware, streaming-safe).

- Host: when the server listens on loopback, the Host header must name loopback too. A page on
  another site whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) sends its own name: refused.
- Origin: a state-changing request (POST, PUT, PATCH, DELETE) that carries an Origin other than the
  server's own (scheme://Host), or Sec-Fetch-Site: cross-site, is refused: browsers always send
  Origin on cross-site POSTs (fetch and forms alike); programs (curl, the openai client) send none.
- Token: state-changing /ui/api requests also need the header X-Plugtune-Token, a random value the
  page receives inside its HTML. Another site can neither read it (same-origin policy) nor send a
  custom header cross-site without a CORS preflight, which this server never grants.
- API key: when set (it must be when listening beyond loopback), /ui/api needs it like /v1 does.
"""
from __future__ import annotations

import hmac
import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
TOKEN_HEADER = "x-plugtune-token"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def check_request(method: str, path: str, headers: dict[str, str], *, loopback_only: bool, token: str,
                  api_key: str | None) -> tuple[int, str] | None:
    """(status, message) when the request must be refused, else None."""
    host = headers.get("host", "")
    if loopback_only and not is_loopback(_hostname(host)):
        return 403, (f"Host {host!r} is not this machine: the UI listens on loopback only and refuses other "
                     "host names (DNS rebinding). Open it as http://127.0.0.1:PORT/ui/")
    if method in UNSAFE:
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc != host:
                return 403, (f"cross-site request refused: Origin {origin} is not this server ({host}). Use the "
                             "page this server serves, or a program that sends no Origin")
        elif origin == "null" or headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused (opaque or cross-site origin)"
        if path.startswith("/ui/api") and not hmac.compare_digest(headers.get(TOKEN_HEADER, "").encode(),
                                                                  token.encode()):
            return 403, ("missing or wrong X-Plugtune-Token header: reload the page (each server start issues a "
                         "new token)")
    if api_key and path.startswith("/ui/api"):
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            return 401, "this server needs its API key: enter it in the page's API key box (Authorization: Bearer)"
    return None


class PageGuard:
    def __init__(self, app, *, loopback_only: bool, token: str, api_key: str | None):
        self.app, self.loopback_only, self.token, self.api_key = app, loopback_only, token, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = check_request(scope["method"], scope["path"], headers, loopback_only=self.loopback_only,
                                token=self.token, api_key=self.api_key)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "forbidden" if status == 403 else "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
