"""One run over several processes or hosts, with JAX's own distributed runtime.

Every process runs the same program (JAX's multi-controller model): it loads only the weight shards of
its own devices, runs the same jitted prefill and decode programs over the global mesh, and reads back
the same replicated tokens, so every process computes identical outputs.

    from jaxpipe import distributed
    distributed.initialize("host0:1234", num_processes=2, process_id=0)   # on host0
    distributed.initialize("host0:1234", num_processes=2, process_id=1)   # on host1

or set ``JAXPIPE_COORDINATOR``, ``JAXPIPE_NUM_PROCESSES`` and ``JAXPIPE_PROCESS_ID`` and let
``jaxpipe.LLM`` call :func:`initialize` itself. Call it before anything touches a JAX device.

JAX's runtime aborts the whole process (no Python exception) when its connection deadline passes, so
:func:`initialize` guards it: a process other than 0 first waits (at most ``timeout_s``) for the
coordinator's port to answer, and the connection itself runs in a helper thread that the caller stops
waiting for after ``timeout_s``. Either way the caller gets a :class:`DistributedError` that names the
address and what to check. After such an error this process cannot join a run any more: exit it. The
abandoned connection is detached from JAX so that exiting is quick and quiet (JAX would otherwise shut
it down at exit, logging the coordination service's "Barrier failed" errors after ours).

On CPU, JAX's gloo collectives print ``[Gloo] Rank 0 is connected to 1 peer ranks ...`` on the
process's stdout (C++ ``std::cout``, file descriptor 1) each time they connect a group of devices. So
that stdout carries only what the program prints, :func:`initialize` routes descriptor 1 through a
filter (:func:`filter_native_stdout`) that drops those notices and passes everything else through;
Python's ``sys.stdout`` keeps writing to the real stdout directly.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import io
import json
import os
import re
import select
import socket
import sys
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxpipe.argtypes import non_negative_int, positive_float, positive_int
from jaxpipe.errors import JaxpipeError

ENV_COORDINATOR = "JAXPIPE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXPIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPIPE_PROCESS_ID"

# JAX aborts the process when its own connection deadline passes; ours comes first, and JAX's is set this
# much later so that a process that reports our error can exit normally instead of being aborted.
_JAX_DEADLINE_GRACE_S = 24 * 3600
_PROBE_INTERVAL_S = 0.2


class DistributedError(JaxpipeError):
    """A multi-process run that could not start: bad options, unreachable coordinator, missing peers."""


class CoordinatorUnreachableError(DistributedError):
    """Process ``i > 0`` found nothing listening at the coordinator address within the timeout."""


class OptionsMismatchError(DistributedError):
    """The processes of one run were started with different options."""


# What this module initialized with (None: not by us), and why an earlier attempt failed (None: it didn't).
_initialized_with: dict[str, Any] | None = None
_failed: str | None = None
_lock = threading.Lock()
_abandoned: list[Any] = []           # JAX's client and service of a connection that timed out (kept alive)
_stdout_filter: threading.Thread | None = None
# gloo's notice when it has connected a group: "[Gloo] Rank 0 is connected to 1 peer ranks. Expected
# number of connected peer ranks is : 1\n". Threads print theirs at the same time, piece by piece
# (std::cout <<), so one notice may land inside another: removing whole notices repeatedly undoes most
# of that, and what is left of notices after a short wait (lines of their pieces only) is dropped. (A
# group whose peers do not all connect fails with its own error, so the notice's counts add nothing.)
_GLOO_CONNECTED = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. "
                             rb"Expected number of connected peer ranks is : \d+\n")
_GLOO_PIECES = re.compile(rb"(?:\[Gloo\] Rank | is connected to | peer ranks\. ?|"
                          rb"Expected number of connected peer ranks is : ?|\d+|[ \t])*\n?")
_GLOO_START = b"[Gloo]"
_GLOO_HOLD_MAX = 4096   # bytes held back waiting for the rest of a notice (one is about 100)
_GLOO_HOLD_S = 0.2      # and for how long


# -- options ----------------------------------------------------------------------------------------------

def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


def _split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator address {address!r} must be HOST:PORT (for example host0:1234), the host of "
            "process 0 and a free port on it")
    return host.strip("[]"), int(port)


def resolve_options(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> dict[str, Any]:
    """Arguments, else the ``JAXPIPE_*`` environment variables; ``None`` where neither says anything."""
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR, "").strip() or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}


def is_configured(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> bool:
    """Whether the arguments or the environment ask for a multi-process run."""
    return any(v is not None for v in resolve_options(coordinator_address, num_processes, process_id).values())


def _validate(opts: dict[str, Any], auto: bool) -> None:
    missing = [k for k, v in opts.items() if v is None]
    if missing and not auto:
        flags = {"coordinator_address": f"--coordinator-address / {ENV_COORDINATOR}",
                 "num_processes": f"--num-processes / {ENV_NUM_PROCESSES}",
                 "process_id": f"--process-id / {ENV_PROCESS_ID}"}
        raise DistributedError(
            "a multi-process run needs coordinator_address, num_processes and process_id; missing: "
            + ", ".join(f"{k} ({flags[k]})" for k in missing)
            + " (or pass auto=True to let JAX detect them from SLURM, Open MPI, ...)")
    n, i = opts["num_processes"], opts["process_id"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DistributedError(f"num_processes must be a positive integer, got {n!r}")
    if i is not None and (not isinstance(i, int) or isinstance(i, bool) or i < 0):
        raise DistributedError(f"process_id must be a non-negative integer, got {i!r}")
    if n is not None and i is not None and i >= n:
        raise DistributedError(f"process_id={i} is out of range for num_processes={n}: use 0 .. {n - 1}")
    if opts["coordinator_address"] is not None:
        _split_address(opts["coordinator_address"])


# -- initialize ---------------------------------------------------------------------------------------------

def _backends_up() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: let JAX's own check speak
        return False


def _wants_cpu() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return not platforms or "cpu" in [p.strip() for p in platforms.split(",")]


def _wait_for_coordinator(address: str, deadline: float, opts: dict[str, Any], timeout_s: float) -> None:
    """Until ``deadline``: try a TCP connection to the coordinator; raise a clear error if none succeeds."""
    host, port = _split_address(address)
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, left))):
                return
        except OSError as e:  # refused, unreachable, unresolvable, timed out
            last = e
        if time.monotonic() + _PROBE_INTERVAL_S >= deadline:
            break
        time.sleep(_PROBE_INTERVAL_S)
    raise CoordinatorUnreachableError(
        f"process {opts['process_id']} of {opts['num_processes']} could not reach the coordinator at "
        f"{address} within {timeout_s:g} s (last error: {last}). Check that process 0 is running and was "
        f"started with the same coordinator address ({address}), that '{host}' is the host of process 0 and "
        f"resolves to it from this machine, and that port {port} is open between the hosts (firewall). "
        "Process 0 must start within the timeout of the others (raise timeout_s / --distributed-timeout).")


def _check_port_free(address: str) -> None:
    """Process 0 binds the coordinator's port on all interfaces: say so clearly when it is taken."""
    _, port = _split_address(address)
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(
                    f"process 0 runs the coordinator on port {port} ({address}), but that port is already in "
                    "use on this host (an earlier run still alive?). Pick another free port for every "
                    "process, or stop the program holding it.") from None
        finally:
            s.close()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               timeout_s: float = 60, cpu_collectives: str | None = "gloo", *, auto: bool = False,
               quiet_gloo: bool = True) -> bool:
    """Join a multi-process run with ``jax.distributed``; a no-op when nothing asks for one.

    Args:
        coordinator_address: ``HOST:PORT`` of process 0 (it listens there); default ``$JAXPIPE_COORDINATOR``.
        num_processes: processes in the run; default ``$JAXPIPE_NUM_PROCESSES``.
        process_id: this process, ``0 .. num_processes - 1``; default ``$JAXPIPE_PROCESS_ID``.
        local_device_ids: restrict this process to these local devices (GPU ids), as in JAX.
        timeout_s: how long to wait for the coordinator and for all processes to connect.
        cpu_collectives: CPU collectives implementation (``gloo``, ``mpi``), set when JAX may run on CPU;
            ``None`` leaves JAX's setting alone.
        auto: when nothing is configured (or only part), let JAX detect the cluster (SLURM, Open MPI,
            TPU pods...) as ``jax.distributed.initialize()`` with no arguments does.
        quiet_gloo: with gloo CPU collectives, keep gloo's connection notices off stdout
            (:func:`filter_native_stdout`).

    Returns True when this process is part of an initialized multi-process run, False when nothing was
    configured (a single-process run; nothing was touched).

    Calling it again with the same options (or none) is a no-op; with different ones it raises
    :class:`DistributedError` naming them. Must run before anything touches a JAX device.
    """
    global _initialized_with, _failed
    opts = resolve_options(coordinator_address, num_processes, process_id)
    if isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    if local_device_ids is not None:
        local_device_ids = [int(d) for d in local_device_ids]
    configured = any(v is not None for v in opts.values())
    with _lock:
        if _failed is not None:
            raise DistributedError(
                f"an earlier jaxpipe.distributed.initialize failed ({_failed}); this process cannot join a run "
                "any more: exit it and start it again")
        if jax.distributed.is_initialized():
            _check_same_init(opts, local_device_ids, cpu_collectives, configured)
            return True
        if not configured and not auto:
            return False
        _validate(opts, auto)
        if _backends_up():
            raise DistributedError(
                "jaxpipe.distributed.initialize must run before JAX touches any device, but JAX's backend is "
                "already up (jax.devices(), an array, a jitted call...). Create the LLM, or call "
                "initialize, first thing in the program.")

        timeout_s = float(timeout_s)
        if timeout_s <= 0:
            raise DistributedError(f"timeout_s must be positive, got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        address = opts["coordinator_address"]
        if address is not None and opts["process_id"] is not None:
            if opts["process_id"] == 0:
                _check_port_free(address)
            else:
                _wait_for_coordinator(address, deadline, opts, timeout_s)

        if cpu_collectives is not None and _wants_cpu():
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)

        kwargs = dict(coordinator_address=address, num_processes=opts["num_processes"],
                      process_id=opts["process_id"], local_device_ids=local_device_ids)
        if not auto:
            kwargs["cluster_detection_method"] = "deactivate"  # only what we were told, no guessing
        left = max(1.0, deadline - time.monotonic())
        kwargs["initialization_timeout"] = int(left) + _JAX_DEADLINE_GRACE_S
        outcome: dict[str, BaseException] = {}

        def connect() -> None:
            try:
                jax.distributed.initialize(**kwargs)
            except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
                outcome["error"] = e

        worker = threading.Thread(target=connect, name="jaxpipe-distributed-init", daemon=True)
        worker.start()
        worker.join(left)
        where = address or "(auto-detected)"
        if worker.is_alive():
            n, i = opts["num_processes"], opts["process_id"]
            if i == 0:
                msg = (f"process 0 started the coordinator at {where} but not all {n} processes connected "
                       f"within {timeout_s:g} s. Start the others with the same coordinator address and "
                       f"--num-processes {n}, process ids 1 .. {n - 1} (each once), and check that they can "
                       f"reach this host's port {_split_address(address)[1]} (firewall).")
            else:
                msg = (f"process {i} of {n} reached the coordinator at {where}, but the run did not assemble "
                       f"within {timeout_s:g} s: check that all {n} processes were started, with process ids "
                       f"0 .. {n - 1} (each once) and the same --num-processes.")
            _failed = f"timed out after {timeout_s:g} s at {where}"
            _detach_jax_state()
            raise DistributedError(msg + " This process cannot join a run any more: exit it.")
        if "error" in outcome:
            e = outcome["error"]
            _reset_jax_state()
            text = str(e)
            if "Failed to start RPC server" in text and address is not None:
                text += f" (is port {_split_address(address)[1]} free on this host?)"
            if auto and address is None and "coordinator_address" in text:
                text += (" (auto=True found no cluster environment such as SLURM or Open MPI; pass "
                         "coordinator_address, num_processes and process_id)")
            raise DistributedError(f"jax.distributed.initialize at {where} failed: {type(e).__name__}: {text}") from e

        from jax._src import distributed as _jd  # what JAX settled on (auto-detection may fill gaps)
        _initialized_with = {"coordinator_address": _jd.global_state.coordinator_address,
                             "num_processes": _jd.global_state.num_processes,
                             "process_id": _jd.global_state.process_id,
                             "local_device_ids": local_device_ids, "cpu_collectives": cpu_collectives}
        if quiet_gloo and cpu_collectives == "gloo" and _wants_cpu():
            filter_native_stdout()
        return True


def _detach_jax_state() -> None:
    """After a timed-out connection: take JAX's half-connected client and service out of its global state
    (so that its exit handler neither waits for them nor logs their shutdown), and keep them alive here
    (destroying them would do the same)."""
    try:
        from jax._src import distributed as _jd
        state = _jd.global_state
        _abandoned.extend([state.client, state.service])
        state.client = None
        state.service = None
    except (ImportError, AttributeError):  # private API moved: JAX's own exit handling then
        pass


def filter_native_stdout() -> None:
    """Route file descriptor 1 (native libraries' stdout) through a filter that drops gloo's "connected"
    notices, and point Python's ``sys.stdout`` straight at the real stdout. Idempotent.

    gloo writes the notice with C++ ``std::cout`` whenever it connects a group of devices (six times per
    process in a 4-device pipeline); only descriptor-level redirection reaches it. Any other output on
    descriptor 1 (from native code or child processes) is passed on to the real stdout, unchanged (held
    back at most 0.2 s when it follows an unfinished notice).
    """
    global _stdout_filter
    if _stdout_filter is not None:
        return
    try:
        python_on_fd1 = sys.stdout is not None and sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        python_on_fd1 = False  # e.g. a notebook or a captured stdout: Python output does not use fd 1
    if python_on_fd1:
        sys.stdout.flush()
    real = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    if python_on_fd1:
        old = sys.stdout
        sys.stdout = io.TextIOWrapper(io.FileIO(os.dup(real), "w"), encoding=old.encoding, errors=old.errors,
                                      line_buffering=old.line_buffering,
                                      write_through=getattr(old, "write_through", False))

    def forward() -> None:
        held = b""
        while True:
            try:
                ready = select.select([read_end], [], [], _GLOO_HOLD_S if held else None)[0]
                data = os.read(read_end, 1 << 16) if ready else b""
            except OSError:
                return
            out, held = split_gloo_notices(held + data, final=not data)
            try:
                if out:
                    os.write(real, out)
            except OSError:  # a closed pipe downstream: nothing more to show
                pass
            if ready and not data:  # the end of the stream
                return

    _stdout_filter = threading.Thread(target=forward, name="jaxpipe-stdout-filter", daemon=True)
    _stdout_filter.start()

    def drain() -> None:  # at exit: hand descriptor 1 back to the real stdout, pass on what is left
        try:
            sys.stdout.flush()
            os.dup2(real, 1)  # closes the pipe's last write end here: the filter reads to its end
        except (OSError, ValueError):
            return
        _stdout_filter.join(timeout=2.0)

    atexit.register(drain)


def split_gloo_notices(data: bytes, final: bool = False) -> tuple[bytes, bytes]:
    """What arrived on descriptor 1, split into (pass on to stdout, hold back for more).

    Whole gloo notices are removed; from a ``[Gloo]`` that is not complete yet on, bytes are held back
    until the rest comes (at most ``_GLOO_HOLD_MAX`` of them). With ``final`` (nothing more came in
    time) nothing is held: lines of the held part made only of notices' pieces are dropped.
    """
    while (m := _GLOO_CONNECTED.search(data)) is not None:
        data = data[:m.start()] + data[m.end():]
    cut = data.find(_GLOO_START)
    if cut < 0:  # the end may be the start of "[Gloo]"
        cut = next((len(data) - k for k in range(min(len(_GLOO_START) - 1, len(data)), 0, -1)
                    if _GLOO_START.startswith(data[-k:])), len(data))
    if final or len(data) - cut > _GLOO_HOLD_MAX:
        rest = b"".join(line for line in data[cut:].splitlines(keepends=True)
                        if not _GLOO_PIECES.fullmatch(line))
        return data[:cut] + rest, b""
    return data[:cut], data[cut:]


def _reset_jax_state() -> None:
    """After a failed (raised, not hung) jax.distributed.initialize, leave JAX as if never called."""
    try:
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 (best effort; the error we raise matters more)
        pass


def _check_same_init(opts: dict[str, Any], local_device_ids, cpu_collectives, configured: bool) -> None:
    if not configured and local_device_ids is None:
        return
    if _initialized_with is not None:
        current = dict(_initialized_with)
    else:  # initialized by someone else (jax.distributed.initialize directly): compare what JAX knows
        from jax._src import distributed as _jd
        current = {"coordinator_address": _jd.global_state.coordinator_address,
                   "num_processes": _jd.global_state.num_processes,
                   "process_id": _jd.global_state.process_id}
    asked = dict(opts, local_device_ids=local_device_ids)
    if _initialized_with is not None:
        asked["cpu_collectives"] = cpu_collectives
    diffs = [f"{k}: now {asked[k]!r}, before {current[k]!r}" for k in asked
             if k in current and asked[k] is not None and asked[k] != current[k]]
    if diffs:
        raise DistributedError(
            "jax.distributed is already initialized in this process with other options ("
            + "; ".join(diffs) + "). A process joins one run only: start a new process for another run.")


# -- queries and checks -------------------------------------------------------------------------------------

def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def is_coordinator() -> bool:
    """True on process 0 (and in a single-process run). Does not touch devices when not distributed."""
    if not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


def check_same_options(options: dict[str, Any]) -> None:
    """Called by every process with its options: raise on every process if any option differs.

    A collective (every process of the run must call it at the same point). The error names each
    differing option with every process's value. A no-op in a single-process run.
    """
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    canon = {k: json.dumps(v, sort_keys=True, default=repr) for k, v in options.items()}
    blob = json.dumps(canon, sort_keys=True).encode()
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(blob)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    per_process = [json.loads(bytes(gathered[p, : int(lengths[p])]).decode()) for p in range(len(lengths))]
    keys = sorted(set().union(*per_process))
    missing = "<not given>"
    diffs = []
    for k in keys:
        values = [d.get(k, missing) for d in per_process]
        if len(set(values)) > 1:
            diffs.append(f"{k}: " + ", ".join(f"process {p} has {v}" for p, v in enumerate(values)))
    if diffs:
        raise OptionsMismatchError(
            f"the {len(per_process)} processes of this run were started with different options — "
            + "; ".join(diffs) + ". Start every process with the same options (only the process id differs).")


# -- the run's key-value store (for the engine's per-step broadcast) ----------------------------------------

KV_TIMEOUT_S = 24 * 3600.0  # a follower waits this long for process 0's next step (a server may sit idle)


def _kv_client():
    # The distributed runtime's key-value store (a gRPC service on process 0's coordinator): JAX exposes no
    # public API for it; orbax and JAX's own multihost utilities use this client the same way.
    from jax._src import distributed as _jd
    client = _jd.global_state.client
    if client is None:
        raise JaxpipeError("jax.distributed is not initialized: there is no key-value store to use")
    return client


def kv_set(key: str, value: str) -> None:
    """Publish ``value`` under ``key`` for every process of the run."""
    _kv_client().key_value_set(key, value)


def kv_get(key: str, timeout_s: float = KV_TIMEOUT_S) -> str:
    """Wait for ``key`` to be published (by any process) and return its value."""
    client = _kv_client()
    deadline = time.monotonic() + timeout_s
    while True:  # in slices, so a Ctrl-C between them is honoured
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedError(f"timed out after {timeout_s:.0f} s waiting for {key!r} from process 0")
        try:
            return client.blocking_key_value_get(key, int(min(left, 60.0) * 1000))
        except Exception as e:  # noqa: BLE001 (the client raises a plain XlaRuntimeError on a timeout)
            if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                raise


def kv_delete(key: str) -> None:
    try:
        _kv_client().key_value_delete(key)
    except Exception:  # noqa: BLE001 (a key another process already removed)
        pass


# -- command-line helpers (for jaxpipe/cli.py) ------------------------------------------------------------

def add_distributed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator-address``, ``--num-processes``, ``--process-id``, ``--distributed-timeout`` and
    ``--distributed-auto`` to ``parser`` (an argument group); pair with :func:`initialize_from_args`."""
    g = parser.add_argument_group(
        "several processes or hosts",
        f"one run over several processes (JAX's distributed runtime); defaults come from {ENV_COORDINATOR}, "
        f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}; every process gets the same options but its own id")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="host of process 0 and a free port there, the same for every process")
    g.add_argument("--num-processes", type=positive_int, default=None, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=non_negative_int, default=None, metavar="I", help="this process: 0 .. N-1")
    g.add_argument("--distributed-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the coordinator and the other processes (default 60)")
    g.add_argument("--distributed-auto", action="store_true",
                   help="let JAX detect the cluster (SLURM, Open MPI, ...) instead of the three flags")
    return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
    """:func:`initialize` from the flags :func:`add_distributed_arguments` added (env vars fill gaps)."""
    return initialize(coordinator_address=getattr(args, "coordinator_address", None),
                      num_processes=getattr(args, "num_processes", None),
                      process_id=getattr(args, "process_id", None),
                      timeout_s=getattr(args, "distributed_timeout", 60.0),
                      auto=bool(getattr(args, "distributed_auto", False)))
