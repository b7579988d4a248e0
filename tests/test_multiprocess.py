"""One run over several processes with jax.distributed (gloo on CPU): 2 processes x 2 virtual CPU devices,
against one process with 4 devices and against transformers; unreachable coordinator; mismatched options;
nothing but the program's own output on stdout (no gloo notices), nothing after a jaxpipe error.

Every subprocess is started here and ended here (killed at its deadline, and in ``finally``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mp_worker.py"
TOTAL_BUDGET_S = 240          # the whole module
LAYOUTS = ["4x1", "2x2"]      # PP x TP over 4 devices
MAX_TOKENS = 8
_T_START: float | None = None  # set when the module's first test starts, not at collection

sys.path.insert(0, str(WORKER.parent))
from mp_worker import PROMPTS  # noqa: E402
from conftest import FAST_COMPILE


@pytest.fixture(autouse=True, scope="module")
def _module_clock():
    global _T_START
    _T_START = time.monotonic()
    yield


def _left() -> float:
    left = TOTAL_BUDGET_S - (time.monotonic() - _T_START)
    if left <= 5:
        pytest.fail(f"tests/test_multiprocess.py ran past its {TOTAL_BUDGET_S} s budget")
    return left


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXPIPE_") and "proxy" not in k.lower()}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user sees: JAX's C++ logging at its default level
    return env


class Workers:
    """Started worker processes; ``wait`` collects them or kills them at the deadline."""

    def __init__(self):
        self.procs: list[tuple[subprocess.Popen, list]] = []

    def start(self, *args, devices: int = 2) -> int:
        cmd = [sys.executable, str(WORKER), *map(str, args)]
        p = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append((p, cmd))
        return len(self.procs) - 1

    def wait(self, index: int, timeout: float) -> dict:
        """rc, the parsed MPWORKER / MPWORKER_ERROR line, stderr tail and elapsed seconds."""
        p, cmd = self.procs[index]
        try:
            out, err = p.communicate(timeout=min(timeout, _left()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = p.communicate()
            pytest.fail(f"worker {cmd} did not finish in time; stderr tail:\n{err[-3000:]}")
        res = {"rc": p.returncode, "stdout": out, "stderr": err[-4000:], "result": None, "error": None,
               "full_stderr": err}
        for line in out.splitlines():
            if line.startswith("MPWORKER "):
                res["result"] = json.loads(line[len("MPWORKER "):])
            elif line.startswith("MPWORKER_ERROR "):
                res["error"] = json.loads(line[len("MPWORKER_ERROR "):])
        return res

    def kill_all(self):
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
        for p, _ in self.procs:
            try:
                p.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass


@pytest.fixture
def workers():
    w = Workers()
    try:
        yield w
    finally:
        w.kill_all()


@pytest.fixture(scope="module", autouse=True)
def waiting_workers():
    """Started first, as they mostly wait (their test reads them later): process 1 of 2 pointed at a port
    nothing listens on (timeout 10 s), and process 0 of 2 whose peer never comes (timeout 5 s; JAX alone
    would abort it)."""
    w = Workers()
    try:
        address = f"127.0.0.1:{free_port()}"
        late = w.start("--mode", "init", "--coordinator", address, "--num-processes", 2, "--process-id", 1,
                       "--timeout", 10)
        alone_address = f"127.0.0.1:{free_port()}"
        alone = w.start("--mode", "init", "--coordinator", alone_address, "--num-processes", 2,
                        "--process-id", 0, "--timeout", 5)
        yield w, (late, address), (alone, alone_address)
    finally:
        w.kill_all()


# -- the tiny checkpoint and its transformers reference -------------------------------------------------------

def make_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words: LLM loads the checkpoint's own tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 4-layer Llama (4 heads, 2 KV heads) saved as an HF checkpoint, and transformers' greedy
    tokens for PROMPTS."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init, so greedy choices are far from ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    make_tokenizer(path, cfg.vocab_size)
    ref = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            for _ in range(MAX_TOKENS):  # plain argmax, EOS ignored (as ignore_eos=True)
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.argmax(logits)))
            ref.append(ids[len(prompt):])
    return path, ref


# -- tests --------------------------------------------------------------------------------------------------

def test_two_processes_match_one_process_and_transformers(tiny_model, workers):
    path, ref = tiny_model
    port = free_port()
    common = ["--model", path, "--layouts", *LAYOUTS, "--max-tokens", MAX_TOKENS]
    mp = [workers.start(*common, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                        "--process-id", i, devices=2) for i in range(2)]
    single = workers.start(*common, devices=4)
    results = [workers.wait(i, 200) for i in mp]
    one = workers.wait(single, 200)

    for i, r in enumerate(results):
        assert r["rc"] == 0 and r["result"], f"process {i} failed (rc {r['rc']}):\n{r['stdout']}\n{r['stderr']}"
        # stdout carries only what the program printed: gloo's "[Gloo] Rank 0 is connected to 1 peer
        # ranks ..." notices (C++ std::cout, once per device group) are filtered out, on stderr too.
        assert [line.split(" ", 1)[0] for line in r["stdout"].splitlines()] == ["MPWORKER"], r["stdout"]
        assert "[Gloo]" not in r["full_stderr"], r["stderr"]
    assert one["rc"] == 0 and one["result"], f"single process failed:\n{one['stdout']}\n{one['stderr']}"
    r0, r1 = results[0]["result"], results[1]["result"]
    assert (r0["process"], r1["process"]) == (0, 1)
    assert r0["process_count"] == r1["process_count"] == 2
    assert r0["local_devices"] == r1["local_devices"] == 2 and r0["devices"] == 4
    assert (r0["coordinator"], r1["coordinator"]) == (True, False)
    assert one["result"]["process_count"] == 1 and one["result"]["devices"] == 4
    for i, r in enumerate((r0, r1)):
        assert r["reinit"]["same"] is True
        assert f"process_id: now {1 - i}, before {i}" in r["reinit"]["different"], r["reinit"]
    assert one["result"]["reinit"] == {"same": False}

    for spec in LAYOUTS:
        assert r0["tokens"][spec] == r1["tokens"][spec], f"{spec}: the two processes disagree"
        assert r0["tokens"][spec] == one["result"]["tokens"][spec], f"{spec}: 2 processes != 1 process"
        assert r0["tokens"][spec] == ref, f"{spec}: jaxpipe != transformers greedy"
        # Seeded sampling: the same on both processes, as one process, and in every layout (noise is a function
        # of seed, step and token id, not of the layout or the batch).
        assert r0["sampled"][spec] == r1["sampled"][spec] == one["result"]["sampled"][spec], spec
        assert r0["sampled"][spec] == r0["sampled"][LAYOUTS[0]], f"{spec}: seeded samples depend on the layout"
        # Prompt logprobs (issue 16): the same top ids, logprobs within 1e-5 of one process (test_scoring.py
        # checks one process against transformers).
        assert r0["scored"][spec] == r1["scored"][spec], f"{spec}: the two processes score differently"
        for got, want in zip(r0["scored"][spec], one["result"]["scored"][spec]):
            assert [top for _, top in got] == [top for _, top in want], spec
            np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], atol=1e-5, rtol=0)

    # Each process read only its own devices' shards: its stages' layers, its end of the vocabulary tables.
    stage_layers = {"4x1": [{0, 1}, {2, 3}], "2x2": [{0, 1}, {2, 3}]}  # 4 stages of 1 / 2 stages of 2
    for spec in LAYOUTS:
        for proc, r in enumerate((r0, r1)):
            log = r["reads"][spec]
            layers = {layer for name, layer, _ in log if layer is not None}
            assert layers == stage_layers[spec][proc], f"{spec} process {proc} read layers {sorted(layers)}"
            # The embedding lives on the first stage (process 0), the lm_head on the last (process 1).
            vocab = {(name, i) for name, _, rr in log if name in ("embed", "lm_head") for i in range(*rr)}
            want = "embed" if proc == 0 else "lm_head"
            assert vocab == {(want, i) for i in range(128)}, f"{spec} process {proc} read {sorted(vocab)[:4]}..."


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(waiting_workers):
    w, (late, address), (alone, alone_address) = waiting_workers
    r = w.wait(late, 60)
    assert r["rc"] == 2 and r["error"], f"expected a jaxpipe error:\n{r['stdout']}\n{r['stderr']}"
    assert r["full_stderr"] == "", r["stderr"]  # nothing after jaxpipe's error
    assert r["error"]["error"] == "CoordinatorUnreachableError"
    assert address in r["error"]["message"] and "process 1 of 2" in r["error"]["message"]
    assert 9 <= r["error"]["elapsed_s"] < 13, r["error"]
    a = w.wait(alone, 60)
    assert a["rc"] == 2 and a["error"], f"expected a jaxpipe error:\n{a['stdout']}\n{a['stderr']}"
    # Nothing after jaxpipe's error: no coordination-service "Barrier failed" block as the process exits.
    assert a["full_stderr"] == "", a["stderr"]
    assert a["error"]["error"] == "DistributedError"
    assert alone_address in a["error"]["message"] and "not all 2 processes connected" in a["error"]["message"]
    assert 4 <= a["error"]["elapsed_s"] < 8, a["error"]


def test_processes_with_different_options_fail_naming_the_option(tiny_model, workers):
    path, _ = tiny_model
    port = free_port()
    procs = [workers.start("--model", path, "--layouts", "4x1", "--max-model-len", 64 + 32 * i,
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i)
             for i in range(2)]
    for i, idx in enumerate(procs):
        r = workers.wait(idx, 120)
        assert r["rc"] == 2 and r["error"], f"process {i}: expected a jaxpipe error:\n{r['stdout']}\n{r['stderr']}"
        assert r["error"]["error"] == "OptionsMismatchError"
        msg = r["error"]["message"]
        assert "max_model_len" in msg and "process 0 has 64" in msg and "process 1 has 96" in msg, msg
        assert "seed" not in msg, msg


def test_initialize_without_configuration_is_a_no_op(monkeypatch):
    from jaxpipe import distributed

    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_coordinator()
    distributed.check_same_options({"anything": 1})  # single process: nothing to compare
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(distributed.DistributedError, match="coordinator_address.*process_id"):
        distributed.initialize()
    with pytest.raises(distributed.DistributedError, match="process_id=2 is out of range"):
        distributed.initialize("127.0.0.1:1", process_id=2)


def test_command_line_helpers(monkeypatch):
    import argparse

    from jaxpipe import distributed

    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    parser = distributed.add_distributed_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--coordinator-address", "host0:1234", "--num-processes", "2", "--process-id", "1",
                              "--distributed-timeout", "5"])
    assert (args.coordinator_address, args.num_processes, args.process_id, args.distributed_timeout,
            args.distributed_auto) == ("host0:1234", 2, 1, 5.0, False)
    assert distributed.initialize_from_args(parser.parse_args([])) is False  # nothing configured
    with pytest.raises(distributed.DistributedError, match="must be HOST:PORT"):
        distributed.initialize_from_args(parser.parse_args(["--coordinator-address", "host0", "--num-processes",
                                                            "2", "--process-id", "1"]))


def test_native_stdout_filter():
    """filter_native_stdout on its own (no JAX run, so cheap): gloo's notices on descriptor 1 are dropped
    (also when two threads' notices interleave); other native output, a child's and Python's own pass."""
    script = (
        "import os, subprocess, sys\n"
        "from jaxpipe import distributed\n"
        "print('python before', flush=True)\n"
        "distributed.filter_native_stdout()\n"
        "distributed.filter_native_stdout()\n"  # idempotent
        "os.write(1, b'[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\\n')\n"
        "os.write(1, b'[Gloo] Rank 1 is connected to 0 peer ranks. Expected number of connected peer ranks is : 1\\n')\n"
        # two threads' notices interleaved, as seen from one process of a 2-process run
        "os.write(1, b'[Gloo] Rank [Gloo] Rank 2 is connected to 3 peer ranks. Expected number of connected peer '\n"
        "            b'ranks is : 3\\n3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n')\n"
        "os.write(1, b'[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of connected peer ranks is : '\n"
        "            b'[Gloo] Rank 3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n'\n"
        "            b'3\\n')\n"
        "os.write(1, b'42\\n')\n"
        "subprocess.run(['echo', 'from a child'], check=True)\n"
        "print('python after', flush=True)\n"
        "os.write(1, b'native, no newline at the end')\n")  # passed on as the process exits
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=worker_env(1), capture_output=True,
                          text=True, timeout=min(60, _left()))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "python before" and "python after" in out, proc.stdout
    assert "from a child" in out and "42" in out, proc.stdout
    # Python writes straight to the real stdout, descriptor 1 through the filter's thread: a child's output
    # may come after Python's later print, but what is written last on descriptor 1 still comes last.
    assert proc.stdout.endswith("\nnative, no newline at the end"), proc.stdout
    assert proc.stdout.index("python after") < proc.stdout.index("native, no newline"), proc.stdout
    assert "[Gloo]" not in proc.stdout and "peer ranks" not in proc.stdout
    assert proc.stderr == "", proc.stderr


def _notice(rank: int, digits: str = "3") -> bytes:
    return (b"[Gloo] Rank %d is connected to 3 peer ranks. Expected number of connected peer ranks is : " % rank
            + digits.encode() + b"\n")


@pytest.mark.parametrize("data,now,later", [
    (_notice(0) + b"text\n", b"text\n", b""),
    # one thread's notice inside another's, as seen in 2-process runs
    (b"[Gloo] Rank " + _notice(2) + _notice(3)[len(b"[Gloo] Rank "):], b"", b""),
    (_notice(2)[:-2] + _notice(3)[:-2] + b"33\n\n", b"", b""),  # both last digits after both notices
    (_notice(2)[:-2] + _notice(3) + b"3\n", b"", b""),
    (b"42\n[Gloo", b"42\n", b"[Gloo"),  # may be the start of a notice: held back, then passed on
])
def test_split_gloo_notices(data, now, later):
    from jaxpipe.distributed import split_gloo_notices

    passed, held = split_gloo_notices(data)
    assert passed == now
    assert split_gloo_notices(held, final=True) == (later, b"")  # after the wait: notices' pieces dropped
