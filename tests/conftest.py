"""Shared fixtures: tiny random checkpoints per architecture (made with transformers, random
norm weights and biases so those paths are exercised) and the real SmolLM2 GGUF."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Compile every kernel before a model runs, also in CLI subprocesses, so no test's kernel path
# depends on when a background compile ends (edgerun/kernels.py, "Cold JIT cache";
# tests/test_api.py tests that path on its own).
os.environ["EDGERUN_DEFER_COMPILE"] = "0"

CORPUS = """The quick brown fox jumps over the lazy dog. 0123456789 3.14159 2026-11-24
Once upon a time, in a land far away, there lived a small robot who loved to read books.
def main():\n    print("hello, world")\n    return 42\n
Naïve café résumé — 日本語のテキスト, emoji 🙂👍🏽, and tabs\tand  double  spaces.
User: what is the capital of France? Assistant: The capital of France is Paris.
""" * 3

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

ARCHS = {
    # Llama with biases everywhere in attention and llama3 rope scaling
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, rope_theta=50000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
}


def make_tokenizer(directory: Path):
    """A small byte-level BPE with ChatML special tokens, saved the way transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def make_tiny_checkpoint(arch: str, directory: Path, seed: int = 0, config: dict | None = None) -> Path:
    import torch
    import transformers
    config_cls, model_cls, extra = ARCHS[arch]
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    config = getattr(transformers, config_cls)(**{**TINY, **(config or {})}, **extra, vocab_size=len(tok),
                                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch) -> a Hugging Face checkpoint directory, made once per session."""
    made = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from edgerun.default_model import default_gguf
    return default_gguf()


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n) -> list[int]:
    """n greedy tokens without stopping at EOS (the caller compares up to our stop)."""
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def smollm2_ebin(smollm2_gguf, tmp_path_factory) -> Path:
    """The real model packed at f16, as `edgerun chat` packs the default model."""
    from edgerun.convert.pack import pack
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.ebin"
    pack(smollm2_gguf, out, dtype="f16")
    return out
