"""Check an lm-eval run against jaxpipe offline: its loglikelihoods are the offline ``prompt_logprobs`` sums.

Reads the ``samples_*.jsonl`` files that ``lm_eval ... --log_samples --output_path OUT`` wrote, and for
every request recomputes offline, on the same checkpoint, what the server should have answered:

- a loglikelihood request (context, continuation), tokenized as lm-eval's ``local-completions`` does with
  a Hugging Face tokenizer (no special tokens, the context's trailing spaces moved to the continuation, an
  empty context replaced by the EOS token): the sum of ``SamplingParams(prompt_logprobs=1)``'s logprobs
  over the continuation's tokens, and whether each of them was the most likely (rank 1);
- a generate-until request: greedy ``LLM.generate`` with its ``until`` strings and ``max_gen_toks``.

Run it with the flags the server ran with (the model, ``--max-model-len``); it prints one line per task
and exits 1 if any loglikelihood differs by more than ``--tol`` or any greedy flag or text differs::

    python tools/check_lm_eval.py /tmp/lm_eval_out --max-model-len 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def lm_eval_tokens(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's local-completions model makes them (HF tokenizer,
    ``add_bos_token=False``)."""
    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    if context == "":
        cont = encode(continuation)
        prefix = tok.eos_token_id
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def read_samples(path: Path) -> dict[str, list[dict]]:
    """{task: records} from a samples file or every samples_*.jsonl under a directory."""
    files = [path] if path.is_file() else sorted(path.rglob("samples_*.jsonl"))
    if not files:
        raise SystemExit(f"{path}: no samples_*.jsonl (run lm_eval with --log_samples --output_path {path})")
    tasks: dict[str, list[dict]] = {}
    for f in files:
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        tasks.setdefault(task, []).extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
    return tasks


def requests_of(record: dict) -> list[tuple[str, object, object]]:
    """(context, continuation or generation kwargs, lm-eval's answer) per request of one document."""
    out = []
    for i, key in enumerate(sorted(record["arguments"], key=lambda k: int(k.rsplit("_", 1)[1]))):
        args = record["arguments"][key]
        out.append((args["arg_0"], args["arg_1"], record["resps"][i][0]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", type=Path, help="lm_eval's --output_path (or one samples_*.jsonl file)")
    ap.add_argument("--model", default=None, help="the checkpoint the server served (default: the default model)")
    ap.add_argument("--max-model-len", type=int, default=None, help="as the server's")
    ap.add_argument("--dtype", default="auto", help="as the server's")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |difference| of a loglikelihood (default 1e-4)")
    args = ap.parse_args(argv)

    from jaxpipe import LLM, SamplingParams

    tasks = read_samples(args.samples)
    llm = LLM(model=args.model, max_model_len=args.max_model_len, dtype=args.dtype)
    tok = llm.get_tokenizer()
    failures = 0
    for task, records in sorted(tasks.items()):
        reqs = [r for rec in records for r in requests_of(rec)]
        scored = [r for r in reqs if isinstance(r[1], str)]
        generated = [r for r in reqs if isinstance(r[1], dict)]
        worst, bad = 0.0, []
        if scored:
            pairs = [lm_eval_tokens(tok, ctx, cont) for ctx, cont, _ in scored]
            outs = llm.generate([{"prompt_token_ids": c + x} for c, x in pairs],
                                SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
            for (ctx, cont, (ll, greedy)), (c, x), out in zip(scored, pairs, outs):
                ids = c + x
                entries = [out.prompt_logprobs[p][ids[p]] for p in range(len(c), len(ids))]
                want_ll = sum(e.logprob for e in entries)
                want_greedy = all(e.rank == 1 for e in entries)
                diff = abs(float(ll) - want_ll)
                worst = max(worst, diff)
                if diff > args.tol or (str(greedy) == "True") != want_greedy:
                    bad.append(f"  {ctx!r} + {cont!r}: lm-eval {float(ll):.6f} greedy {greedy}, "
                               f"offline {want_ll:.6f} greedy {want_greedy}")
        texts_ok = 0
        if generated:
            prompts = [{"prompt_token_ids": list(tok(ctx, add_special_tokens=False)["input_ids"])}
                       for ctx, _, _ in generated]
            params = [SamplingParams(temperature=0, max_tokens=int(kw.get("max_gen_toks", 256)),
                                     stop=list(kw.get("until", []))) for _, kw, _ in generated]
            for (ctx, _, got), out in zip(generated, llm.generate(prompts, params, use_tqdm=False)):
                if got == out.outputs[0].text:
                    texts_ok += 1
                else:
                    bad.append(f"  {ctx!r}: lm-eval {got!r}, offline {out.outputs[0].text!r}")
        failures += len(bad)
        parts = []
        if scored:
            parts.append(f"{len(scored)} loglikelihoods, largest |lm-eval - offline prompt_logprobs sum| = "
                         f"{worst:.3g} (tol {args.tol:g})")
        if generated:
            parts.append(f"{texts_ok}/{len(generated)} generations equal offline greedy")
        print(f"{task}: " + "; ".join(parts) + ("" if not bad else f"; {len(bad)} differ:\n" + "\n".join(bad)))
    print("all equal" if not failures else f"{failures} requests differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
