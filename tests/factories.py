"""Tiny-model factories for the tests and the benchmark scripts (no downloads).

The tiny models and random IA3 adapters are the ones ``ia3fuse demo`` builds
(``ia3fuse._tiny_models``), re-exported here so tests import every factory from one place; the
tokenizer and the saved-model helper are test-only. Every IA3 model type: ``tests/archs.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ia3fuse._tiny_models import TINY_ARCHS, random_ia3_adapter, tiny_config, tiny_model

__all__ = ["TINY_ARCHS", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model", "random_ia3_adapter"]


def tiny_tokenizer() -> Any:
    """A character-level tokenizer of 98 tokens (printable ASCII, ``<pad>`` 0, ``<eos>`` 1,
    ``<unk>`` 2) that fits the tiny models' vocabulary of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, *, tokenizer: bool = False) -> Path:
    """Save a tiny model (and, with ``tokenizer``, `tiny_tokenizer`) to ``path`` and return it."""
    model = tiny_model(arch, seed)
    model.save_pretrained(str(path))
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return Path(path)
