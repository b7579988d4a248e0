"""Loading speed: time to ready (compile excluded: loading compiles nothing) for an HF directory and for the
jaxpipe directory ``jaxpipe convert`` makes of it, the conversion itself, and the read floors of the same
files measured in the same call. One JSON line per measurement on stdout.

    python tools/bench_loading.py --hf DIR --out DST            # DST: where the converted copy is written

"Loading" is what ``LLM(model=...)`` does before it can generate, minus the tokenizer: ``open_checkpoint``
(validation) + ``PipelineModel`` + ``load_params`` + ``block_until_ready``. GB/s = the checkpoint's tensor
bytes / seconds. Floors: ``cat FILES > /dev/null`` (the page cache when warm, else the disk), the same files
read with numpy (``readinto``, one thread per CPU), safetensors' own reads (``get_slice``, one thread and one
per CPU) and numpy copies out of a memory map (one thread per CPU); ``h2d``: one ``jax.device_put`` of 1 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from jaxpipe import dtypes, partition  # noqa: E402
from jaxpipe.checkpoints import open_checkpoint, split_key  # noqa: E402
from jaxpipe.convert import convert_checkpoint, verify_checkpoint  # noqa: E402
from jaxpipe.loading import load_params  # noqa: E402
from jaxpipe.pipeline import PipelineModel  # noqa: E402

CPUS = os.cpu_count() or 1


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def files_of(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def floor_cat(files: list[str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return sum(os.path.getsize(f) for f in files), time.perf_counter() - t0


def floor_numpy_read(files: list[str], threads: int) -> tuple[int, float]:
    chunk = 64 << 20
    jobs = [(f, off, min(chunk, os.path.getsize(f) - off)) for f in files
            for off in range(0, os.path.getsize(f), chunk)]

    def read(job):
        f, off, n = job
        buf = np.empty(n, np.uint8)
        with open(f, "rb", buffering=0) as fh:
            fh.seek(off)
            fh.readinto(memoryview(buf))
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    return total, time.perf_counter() - t0


def floor_safetensors(files: list[str], threads: int, limit: int) -> tuple[int, float]:
    """get_slice(name)[:] of whole tensors (the first ``limit`` bytes' worth), from ``threads`` threads."""
    jobs, planned = [], 0
    for f in files:
        h = safe_open(f, framework="numpy")
        for name in h.keys():
            s = h.get_slice(name)
            dt = dtypes.from_safetensors(s.get_dtype())
            if dt is None or planned >= limit:
                continue
            planned += int(np.prod(s.get_shape())) * dt.itemsize
            jobs.append((h, name))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(arr.nbytes for arr in pool.map(lambda job: job[0].get_slice(job[1])[:], jobs))
    return total, time.perf_counter() - t0


def floor_memmap(files: list[str], threads: int) -> tuple[int, float]:
    chunk = 64 << 20
    maps = {f: np.memmap(f, dtype=np.uint8, mode="r") for f in files}
    jobs = [(f, off) for f in files for off in range(0, len(maps[f]), chunk)]

    def copy(job):
        f, off = job
        return np.array(maps[f][off:off + chunk]).nbytes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(copy, jobs))
    return total, time.perf_counter() - t0


def tensor_bytes(reader) -> int:
    return sum(reader.nbytes(*split_key(k)) for k in reader.tensor_names())


def load(path: str, args, *, checksums: bool = False):
    """open_checkpoint + PipelineModel + load_params + block_until_ready, timed apart; ``checksums``: compare
    every tensor's crc32 on the way (jaxpipe directories; off by default)."""
    t0 = time.perf_counter()
    reader = open_checkpoint(path)
    if checksums:
        reader.checksums = True
    t1 = time.perf_counter()
    cfg = reader.config
    layout = partition.make_layout(cfg, args.pp, args.tp)
    mesh = partition.make_mesh(layout, jax.devices())
    dtype = dtypes.np_dtype(dtypes.auto_run_dtype(reader.dtype("wq", 0)) if args.dtype == "auto" else args.dtype)
    model = PipelineModel(cfg, layout, mesh, dtype)
    t2 = time.perf_counter()
    stats: dict = {}
    params = load_params(reader, model, workers=args.workers, progress=args.progress or None, stats=stats)
    jax.block_until_ready(params)
    t3 = time.perf_counter()
    return params, reader, {"seconds": round(t3 - t0, 3), "open_s": round(t1 - t0, 3),
                            "model_s": round(t2 - t1, 3), "load_params_s": round(t3 - t2, 3),
                            "run_dtype": dtype.name, "loader": stats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="an HF safetensors checkpoint directory")
    p.add_argument("--out", required=True, help="where to write the converted jaxpipe directory (replaced)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel shards (default 1)")
    p.add_argument("--dtype", default="auto", choices=("auto",) + dtypes.RUN_DTYPES)
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: one per CPU, <= 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed loads of each directory (default 2)")
    p.add_argument("--floor-limit-gb", type=float, default=4.0,
                   help="bytes read by the safetensors get_slice floors (they are slow; default 4 GB)")
    p.add_argument("--progress", action="store_true", help="show the loader's progress bar (stderr)")
    args = p.parse_args(argv)

    devices = jax.devices()  # start the backend before any timing
    import safetensors
    emit(what="env", jax=jax.__version__, safetensors=safetensors.__version__, python=sys.version.split()[0],
         device=devices[0].device_kind, devices=len(devices), cpus=CPUS, layout=f"pp{args.pp}xtp{args.tp}")

    hf_files = files_of(args.hf)
    for i in range(2):  # the first may come from the disk; the second from the page cache
        n, s = floor_cat(hf_files)
        emit(what="floor_cat", dir="hf", run=i, bytes=n, seconds=round(s, 3), gb_per_s=gbps(n, s))
    n, s = floor_numpy_read(hf_files, CPUS)
    emit(what="floor_numpy_readinto", dir="hf", threads=CPUS, bytes=n, seconds=round(s, 3), gb_per_s=gbps(n, s))
    n, s = floor_memmap(hf_files, CPUS)
    emit(what="floor_memmap_copy", dir="hf", threads=CPUS, bytes=n, seconds=round(s, 3), gb_per_s=gbps(n, s))
    for threads in (1, CPUS):
        n, s = floor_safetensors(hf_files, threads, int(args.floor_limit_gb * 1e9))
        emit(what="floor_safetensors_get_slice", dir="hf", threads=threads, bytes=n, seconds=round(s, 3),
             gb_per_s=gbps(n, s))
    host = np.ones(1 << 30, np.uint8)
    for i in range(2):
        t0 = time.perf_counter()
        jax.device_put(host, devices[0]).block_until_ready()
        s = time.perf_counter() - t0
        emit(what="h2d_device_put", run=i, bytes=host.nbytes, seconds=round(s, 3), gb_per_s=gbps(host.nbytes, s))
    del host

    hf_params = None
    for i in range(args.repeats):
        hf_params = None
        gc.collect()
        hf_params, reader, t = load(args.hf, args)
        nbytes = tensor_bytes(reader)
        emit(what="load_hf", run=i, bytes=nbytes, gb_per_s=gbps(nbytes, t["seconds"]), **t)

    t0 = time.perf_counter()
    convert_checkpoint(args.hf, args.out, force=True, progress=args.progress)
    s = time.perf_counter() - t0
    jp_files = files_of(args.out)
    written = sum(os.path.getsize(f) for f in jp_files)
    emit(what="convert", bytes=written, seconds=round(s, 3), gb_per_s=gbps(written, s))
    n, s = floor_cat(jp_files)
    emit(what="floor_cat", dir="jaxpipe", run=0, bytes=n, seconds=round(s, 3), gb_per_s=gbps(n, s))

    jp_params = None
    for checksums in (False, True):
        for i in range(args.repeats):
            jp_params = None
            gc.collect()
            jp_params, reader, t = load(args.out, args, checksums=checksums)
            nbytes = tensor_bytes(reader)
            emit(what="load_jaxpipe", checksums=checksums, run=i, bytes=nbytes, gb_per_s=gbps(nbytes, t["seconds"]),
                 **t)
    same = all(bool(jax.numpy.array_equal(a, b)) for a, b in zip(jax.tree.leaves(hf_params),
                                                                 jax.tree.leaves(jp_params)))
    emit(what="same_params_hf_and_jaxpipe", same=same)
    hf_params = jp_params = None
    gc.collect()

    v = verify_checkpoint(args.out, progress=False)
    emit(what="verify", bytes=v["bytes"], seconds=round(v["seconds"], 3), gb_per_s=gbps(v["bytes"], v["seconds"]))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
