"""`detaudit serve`: an OpenAI-compatible HTTP front (FastAPI + uvicorn) over the local engine.

One background thread owns the engine and runs packed steps while any request is in flight; HTTP handlers submit
sequences to it and await per-step events. Concurrent requests therefore share batches exactly as they do in
`detaudit local`: with stock kernels their tokens depend on the load, with batch-invariant kernels they do not.

Because requests share steps, one request must never be able to fail a step: everything is checked before a
sequence reaches the engine (docs/engine.md, "Admission and cancellation"), and a step that raises anyway is rerun
per sequence by the engine so that only the request that raises fails. A request whose client has gone is aborted
at once, so its KV blocks and batch seat go to the requests still waiting.

schemas.py: the request bodies and the error shape; engine_thread.py: the engine's thread; output.py: a sequence as
OpenAI answers show it; routes.py: the routes.
"""

from detaudit.server.routes import create_app

__all__ = ["create_app"]
