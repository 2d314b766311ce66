"""The streaming checkpoint fold's other output files: what it copies from the base, and the model card.

I/O only; `checkpoint` decides what to fold and writes the tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from .provenance import model_card

__all__ = ["CARD_FILE", "CONFIG_FILE", "copy_files", "write_card"]

CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
# Files that hold weights in some format; never copied to the output (the fold writes its own).
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".ot",
    ".npz",
    ".pkl",
    ".index.json",
)


def _module_dirs(base: Path) -> set[str]:
    """The sub-folders that sentence-transformers' ``modules.json`` names (``1_Pooling``, ``2_Dense``)."""
    try:
        modules = json.loads((base / "modules.json").read_text())
        return {m["path"] for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"]}
    except (OSError, ValueError, TypeError):  # absent or not sentence-transformers': copied as any file
        return set()


def copy_files(base: Path, tmp: Path, config_text: Optional[str]) -> tuple[list[str], list[str]]:
    """Copy what the fold does not write: every non-weight file, sub-folders included.

    Weight files are skipped (the top level's are the checkpoint the fold rewrites; elsewhere,
    e.g. ``onnx/``, they are exports of the unfolded model and would be stale), except inside the
    sentence-transformers modules that ``modules.json`` names: those hold their own weights
    (``2_Dense/``), which the adapter does not touch. Hidden files and folders are skipped.
    """
    copied: list[str] = []
    skipped: list[str] = []
    modules = _module_dirs(base)

    def walk(src: Path, dst: Path, rel: str, keep_weights: bool) -> bool:
        wrote = False
        for p in sorted(src.iterdir()):
            name = f"{rel}{p.name}"
            if p.name.startswith("."):
                skipped.append(name + ("/" if p.is_dir() else ""))
            elif p.is_dir():
                inside = keep_weights or name in modules
                sub = dst / p.name
                empty = not any(p.iterdir())
                if empty:
                    sub.mkdir(parents=True)
                if walk(p, sub, f"{name}/", inside) or empty:
                    wrote = True
            elif not p.is_file() or (name.endswith(_WEIGHT_SUFFIXES) and not keep_weights):
                skipped.append(name)
            else:
                dst.mkdir(parents=True, exist_ok=True)
                if name == CONFIG_FILE and config_text is not None:
                    (dst / p.name).write_text(config_text)
                else:
                    shutil.copyfile(p, dst / p.name)
                copied.append(name)
                wrote = True
        return wrote

    walk(base, tmp, "", False)
    return copied, skipped


def write_card(base: Path, tmp: Path, section: str, title: str) -> None:
    """README.md: the base's model card with the fold's section appended (its bytes kept as they are)."""
    card = base / CARD_FILE
    text = card.read_text(encoding="utf-8", errors="surrogateescape") if card.is_file() else None
    (tmp / CARD_FILE).write_text(model_card(text, section, title), encoding="utf-8", errors="surrogateescape")
