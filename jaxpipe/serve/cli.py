"""``jaxpipe serve [MODEL]``: the OpenAI-compatible server, with vLLM's flag names.

``add_serve_arguments(parser)`` adds the flags to a parser (``jaxpipe/cli.py`` registers the sub-command
with it); ``run_serve(args)`` runs the server and returns the exit status. ``python -m jaxpipe.serve``
runs the same command on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxpipe import distributed
from jaxpipe.argtypes import positive_int, unit_fraction

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
ENV_API_KEY = "JAXPIPE_API_KEY"

SERVE_EPILOG = """\
examples:
  jaxpipe serve                                   # the default model, SmolLM2-135M-Instruct, on 127.0.0.1:8000
  jaxpipe serve /models/Llama-2-7b-hf --pipeline-parallel-size 2 --max-num-seqs 64
  jaxpipe serve /models/llama --host 0.0.0.0 --api-key "$KEY"    # listen on every interface: explicit
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

routes: POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent events),
  GET /v1/models, GET /health (200 once the model is loaded and compiled), GET /metrics (Prometheus).
The server logs one line when it is ready, with its URL. SIGINT or SIGTERM: it stops accepting, ends
what runs and exits.

several processes: start every process with the same flags (and its own --process-id); process 0 serves
HTTP, the others run the engine's schedule in lock step and serve nothing.
"""


def _log_level(text: str) -> str:
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if text.lower() not in levels:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(levels)}, got {text!r}")
    return text.lower()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``jaxpipe serve``: MODEL, the model and layout options of the other sub-commands, the
    distributed flags, the server's (vLLM's names) and ``--debug``."""
    from jaxpipe.cli import add_model_arguments

    parser.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                        help="the checkpoint to serve (as --model; default: SmolLM2-135M-Instruct)")
    group = add_model_arguments(parser)
    group.add_argument("--max-num-seqs", metavar="N", type=positive_int, default=64,
                       help="sequences decoded at once (engine slots); more wait in the queue (default: 64)")
    group.add_argument("--gpu-memory-utilization", metavar="F", type=unit_fraction, default=0.9,
                       help="fraction of each device's memory the engine may use (default: 0.9)")
    group.add_argument("--seed", metavar="N", type=int, default=0,
                       help="seeds the requests that carry no seed of their own (default: 0)")
    group.add_argument("--load-format", metavar="F", default=None,
                       help="'dummy': random weights with the checkpoint's shapes (benchmarks; as vLLM)")
    distributed.add_distributed_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 or :: "
                        "listens on every interface: use --api-key then)")
    g.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    g.add_argument("--served-model-name", metavar="NAME", nargs="+", default=None,
                   help="the model name(s) requests may give; the first is reported in responses "
                        "(default: the model's path; the default model's name for the default model)")
    g.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${ENV_API_KEY}, else none)")
    g.add_argument("--max-waiting-requests", metavar="N", type=positive_int, default=None,
                   help="sequences that may wait for a slot beyond --max-num-seqs before new requests get "
                        "503 with Retry-After (default: 4 x --max-num-seqs)")
    g.add_argument("--uvicorn-log-level", metavar="LEVEL", type=_log_level, default="info",
                   help="log level of the HTTP server (default: info)")
    g.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="do not log every HTTP request")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return parser


def _model(args: argparse.Namespace) -> str | None:
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"the model is given twice, as MODEL ({args.model_tag}) and --model ({args.model}): "
                         "give one")
    model = args.model_tag if args.model_tag is not None else args.model
    if model is not None and not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such file or directory (expected an HF safetensors directory, "
                                "a .gguf file or a `jaxpipe convert` directory)")
    return model


def _setup_logging(level: str) -> None:
    log = logging.getLogger("jaxpipe.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if level in ("debug", "trace") else logging.INFO)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, compile the first programs, then serve until SIGINT/SIGTERM. Returns the exit status."""
    model = _model(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY) or None
    _setup_logging(args.uvicorn_log_level)
    log = logging.getLogger("jaxpipe.serve")

    # Before anything touches a device: a run over several processes joins them first.
    distributed.initialize_from_args(args)
    lead = distributed.is_coordinator()
    sock = None
    if lead:  # bind first: a taken port fails now, not after minutes of loading
        from jaxpipe.serve.app import bind_socket
        sock = bind_socket(args.host, args.port)

    from jaxpipe import LLM
    from jaxpipe.llm import DEFAULT_MODEL_NAME

    kwargs = dict(model=model, dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
                  seed=args.seed, pipeline_parallel_size=args.pipeline_parallel_size,
                  tensor_parallel_size=args.tensor_parallel_size, layer_partition=args.layer_partition,
                  max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization)
    if args.load_format is not None:
        kwargs["load_format"] = args.load_format
    log.info("loading %s", model or DEFAULT_MODEL_NAME)
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    engine.warmup()
    if not lead:
        log.info("process %d: running the engine's schedule for process 0", _process_index())
        engine.run_worker()
        return 0

    from jaxpipe.serve.app import OpenAIServer, run_server

    names = args.served_model_name or [model if model is not None else DEFAULT_MODEL_NAME]
    server = OpenAIServer(engine, names, model_root=getattr(llm, "model_path", model), api_key=api_key,
                          max_waiting_requests=args.max_waiting_requests)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who reaches this port can use the model",
                    args.host)
    run_server(server, sock, log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log)
    return 0


def _process_index() -> int:
    import jax
    return jax.process_index()


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxpipe.serve``: the same as ``jaxpipe serve``, with the ``jaxpipe`` command's exit codes."""
    from jaxpipe.errors import JaxpipeError

    parser = argparse.ArgumentParser(prog="jaxpipe serve", epilog=SERVE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Serve a model with an OpenAI-compatible HTTP API.")
    args = add_serve_arguments(parser).parse_args(argv)
    try:
        return run_serve(args)
    except KeyboardInterrupt:
        return 130
    except (JaxpipeError, ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        print(f"jaxpipe: error: {e}", file=sys.stderr)
        return 2
