"""The OpenAI-compatible HTTP server (#23): :mod:`.protocol` (request and response bodies), :mod:`.app` (the FastAPI
app, one handler per endpoint over an ``AsyncEngine``) and :mod:`.metrics` (Prometheus); ``python -m neox_rt.serve``
starts it."""
