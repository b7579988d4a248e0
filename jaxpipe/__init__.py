"""jaxpipe: pipeline-parallel Llama inference in JAX, with vLLM's API."""

import os as _os


def _default_xla_flags() -> None:
    # XLA's Triton GEMMs halve small-batch bf16 decode speed on H100/H200 next to cuBLAS (measured:
    # 11.4 vs 5.9 ms/step, Llama-2-7B batch 1); prefer cuBLAS unless the user chose otherwise.
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        _os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_enable_triton_gemm=false").strip()


_default_xla_flags()
# JAX preallocates 75% of a GPU by default; a serving engine sizes its KV cache from what the allocator
# manages (LLM's gpu_memory_utilization is a fraction of that), so let it manage 95%, as vLLM takes the GPU.
# An explicit XLA_PYTHON_CLIENT_MEM_FRACTION wins. Only read when JAX starts its GPU backend.
_os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


from jaxpipe.llm import LLM  # noqa: E402
from jaxpipe.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from jaxpipe.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
