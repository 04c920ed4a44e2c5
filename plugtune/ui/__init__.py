"""`plugtune ui`: a local web page to train, watch, compare, chat with and export adapters.

One process and one port: the OpenAI-compatible app of plugtune.serve (create_app) with the UI's
own routes (/ui/api/*) and its static page (/ui/) added. The page talks to the server's own /v1
endpoints for chat and adapter loading, and to /ui/api for runs, training jobs, compare reports and
exports. Training and export run as separate, detached processes that write their state and logs to
files (jobs.py, worker.py), so closing the browser or restarting the page changes nothing.

This package sits above plugtune.serve and plugtune.config (it validates training forms with the
CLI's own config checker); the server never imports it.

The entry points: plugtune.ui.app.build_ui_app (the app) and plugtune.ui.cli (`plugtune ui`). This
__init__ imports nothing, so the worker processes (worker.py) do not load the web stack.
"""
