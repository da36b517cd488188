"""Build the tiny decoder checkpoints of tests/fixtures/lm/ and record transformers' logits.

Run it in a separate environment with PyTorch and transformers (neither is a jcompress
dependency; the tests read only the files this writes)::

    python3 -m venv /tmp/lmfix && /tmp/lmfix/bin/pip install torch transformers tokenizers safetensors numpy
    /tmp/lmfix/bin/python scripts/make_lm_fixtures.py

The committed fixtures were written with Python 3.11.7, torch 2.14.1, transformers
5.24.0, tokenizers 0.23.3, safetensors 0.8.0 and numpy 2.4.6.

What it writes (each folder is a Hugging Face model folder plus ``reference.npz``):

* ``tokenizer.json`` in every folder: one byte-level BPE tokenizer (vocabulary 320,
  special token ``<|endoftext|>``) trained with ``tokenizers`` on the first 24 KB of
  the calibration sentences of ``jcompress.textdata`` (Python's bundled documentation),
  reproduced here so the script needs no jcompress install.
* ``llama_gqa_sharded/``: Llama, 2 layers, hidden 64, 4 heads, 2 key/value heads,
  intermediate 128, untied embeddings, default rotary embeddings with
  ``rope_theta=10000``; saved in 2 safetensors shards with ``model.safetensors.index.json``.
* ``llama_rope3_tied/``: the same sizes with tied embeddings, ``rope_theta=50000`` and
  ``llama3`` rope scaling (factor 8, original context 16, so the long, short and blended
  wavelength ranges all occur in a 16-dimensional head); one ``model.safetensors``.
* ``gpt2/``: GPT-2, 2 layers, n_embd 64, 4 heads, 128 positions.

Weights are random but not the library's near-zero initialisation, so that every
parameter matters to the logits: matrices and embeddings are normal with standard
deviation ``1 / sqrt(fan_in)`` (embeddings 1), norm weights ``1 + 0.1 N(0, 1)`` and biases
``0.1 N(0, 1)``, from ``torch.manual_seed(0)``.

``reference.npz`` holds, for each of 3 prompts ``k``: ``ids_k`` (seq,) int32, the
tokenizer's ids of the prompt, and ``logits_k`` (seq, vocab) float32, transformers'
float32 logits for them (eager attention).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lm"
VOCAB = 320
PROMPTS = [
    "The return statement leaves the current function call.",
    "A class definition is an executable statement",
    "Names refer to objects",
]


def calibration_text(limit_bytes: int = 24_000) -> str:
    """The first ``limit_bytes`` of jcompress.textdata's calibration sentences, joined by spaces."""
    sys.path.insert(0, str(OUT.parent.parent.parent))
    from jcompress.textdata import sentences  # plain Python: needs only the standard library

    text = " ".join(sentences("calibration"))
    return text[:limit_bytes]


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(re.split(r"(?<=\.) ", text), trainer=trainer)
    return tok


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        elif p.ndim == 1:  # norm weights
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif "wte" in name or "wpe" in name or "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        else:
            conv1d = type(dict(model.named_modules())[name.rsplit(".", 1)[0]]).__name__ == "Conv1D"
            fan_in = p.shape[0] if conv1d else p.shape[1]  # Conv1D stores (in, out), Linear (out, in)
            p.copy_(torch.randn_like(p) / fan_in**0.5)


@torch.no_grad()
def write(name: str, model, tok: Tokenizer, **save_kwargs) -> None:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, **save_kwargs)
    tok.save(str(folder / "tokenizer.json"))
    arrays = {}
    for k, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt).ids
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        arrays[f"ids_{k}"] = np.asarray(ids, np.int32)
        arrays[f"logits_{k}"] = logits.astype(np.float32)
    np.savez_compressed(folder / "reference.npz", **arrays)
    files = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{name}: {files}, {size / 1024:.0f} KiB")


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer(calibration_text())
    assert tok.get_vocab_size() <= VOCAB
    sizes = {
        "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "attn_implementation": "eager",
    }
    llama = LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False, rope_theta=10000.0)).float().eval()
    randomize(llama)
    total = sum(p.numel() * 4 for p in llama.parameters())
    write("llama_gqa_sharded", llama, tok, max_shard_size=int(total * 0.6))

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    llama3 = LlamaForCausalLM(
        LlamaConfig(**sizes, tie_word_embeddings=True, rope_theta=50000.0, rope_scaling=scaling)
    ).float().eval()
    randomize(llama3)
    write("llama_rope3_tied", llama3, tok)

    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                   eos_token_id=0, attn_implementation="eager")
    ).float().eval()
    randomize(gpt2)
    write("gpt2", gpt2, tok)


if __name__ == "__main__":
    main()
