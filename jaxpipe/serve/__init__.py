"""``jaxpipe serve``: an OpenAI-compatible HTTP server on the continuous-batching engine.

- ``protocol.py``: the request and response bodies (pydantic).
- ``async_engine.py``: the engine thread that runs ``LLMEngine.step()`` and feeds asyncio queues.
- ``app.py``: the FastAPI routes, errors, streaming, and ``run_server`` (uvicorn, signals).
- ``metrics.py``: ``/metrics`` (prometheus_client).
- ``cli.py``: the command's flags and ``run_serve``.

Importing this package imports none of them (the ``jaxpipe`` command stays quick to start).
"""
