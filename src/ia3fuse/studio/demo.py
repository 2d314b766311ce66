"""``ia3fuse studio --demo``: the tiny model and adapters of ``ia3fuse demo``, plus examples to
score and search on.

The adapters are random, so their outputs are random text; the examples give the page
something to measure: the first half are prompts continued by ``task_a``, the second half
by ``task_b``. No weights reproduce both exactly, and a search finds the mixture that comes
closest (the loss and target-token accuracy on the page show how close).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import atomic_output_file

__all__ = ["build_studio_demo", "DEMO_PROMPTS"]

DEMO_PROMPTS = (
    "The weather today is",
    "My favourite food is",
    "Translate to French: cat",
    "2 + 2 =",
    "Once upon a time",
    "The answer is",
    "Dear customer,",
    "def add(a, b):",
)
TARGET_TOKENS = 6


def build_studio_demo(workdir: Path) -> tuple[Any, Any, Path, list[Path], Path]:
    """Build (or reuse) the demo files under ``workdir``.

    Returns:
        (base model, tokenizer, base folder, adapter folders, examples file ``few.jsonl``).
    """
    from ..demo import build_demo_files
    from ..search import load_tokenizer
    from .session import Studio

    base, base_dir, adapter_dirs = build_demo_files(Path(workdir))
    tokenizer = load_tokenizer(base_dir)
    data = Path(workdir) / "few.jsonl"
    if not data.exists():
        studio = Studio(base, adapter_dirs, tokenizer=tokenizer)
        try:
            half = len(DEMO_PROMPTS) // 2
            records = []
            for k, prompts in enumerate((DEMO_PROMPTS[:half], DEMO_PROMPTS[half:])):
                flat = studio.stack.vectors[k].to(studio.device)
                for prompt, text in zip(prompts, studio._column(flat, list(prompts), TARGET_TOKENS)):
                    records.append({"input": prompt, "target": text or "."})
        finally:
            studio.close()
        with atomic_output_file(data) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return base, tokenizer, base_dir, adapter_dirs, data
