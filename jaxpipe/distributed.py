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
address and what to check. After such an error this process cannot join a run any more: exit it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

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
               timeout_s: float = 60, cpu_collectives: str | None = "gloo", *, auto: bool = False) -> bool:
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
        return True


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
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process: 0 .. N-1")
    g.add_argument("--distributed-timeout", type=float, default=60.0, metavar="SECONDS",
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
