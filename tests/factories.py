"""Tiny-model factories for the tests and the benchmark scripts (no downloads).

The tiny models and random IA3 adapters are the ones ``ia3fuse demo`` builds
(``ia3fuse._tiny_models``, with their character-level tokenizer), re-exported here so tests
import every factory from one place; the saved-model helper is test-only. Every IA3 model type: ``tests/archs.py``.
"""

from __future__ import annotations

from pathlib import Path

from ia3fuse._tiny_models import TINY_ARCHS, random_ia3_adapter, tiny_config, tiny_model, tiny_tokenizer

__all__ = ["TINY_ARCHS", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model", "random_ia3_adapter"]


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, *, tokenizer: bool = False) -> Path:
    """Save a tiny model (and, with ``tokenizer``, `tiny_tokenizer`) to ``path`` and return it."""
    model = tiny_model(arch, seed)
    model.save_pretrained(str(path))
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return Path(path)
