"""Where a folded model came from: the adapter, its fusion recipe, the ia3fuse version.

A fold output records it, so a model file says which adapter it carries: `fold_checkpoint` as a
section of the model card (``README.md``), `fold_gguf` as ``ia3fuse.*`` metadata keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..adapter import IA3Adapter

__all__ = ["GGUF_KEYS", "Provenance", "model_card"]

# The GGUF keys a fold owns: a fold of a folded file replaces all of them (and only them).
GGUF_KEYS = (
    "ia3fuse.version",
    "ia3fuse.adapter.name",
    "ia3fuse.adapter.path",
    "ia3fuse.adapter.base_model",
    "ia3fuse.recipe",
)
CARD_HEADING = "## Folded with ia3fuse"
# how IA3Adapter.save writes the recipe into the adapter's model card
_CARD_RECIPE = re.compile(r"^## Fusion recipe\s*\n+```yaml\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def _version() -> str:
    from .._version import __version__

    return __version__


def _card_recipe(source: Optional[str]) -> Optional[dict[str, Any]]:
    """The recipe that the adapter's own model card records, if it has one (a fused adapter)."""
    if not source:
        return None
    try:
        match = _CARD_RECIPE.search((Path(source) / "README.md").read_text(encoding="utf-8"))
        recipe = yaml.safe_load(match.group(1)) if match else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # no card, or not ia3fuse's: no recipe recorded
        return None
    return recipe if isinstance(recipe, dict) else None


@dataclass(frozen=True)
class Provenance:
    """What a fold output records about its adapter."""

    version: str  # ia3fuse's
    adapter: str  # the adapter's name
    adapter_path: Optional[str]  # the directory it was loaded from
    base_model: Optional[str]  # the adapter's base_model_name_or_path
    recipe: Optional[dict[str, Any]]  # how it was fused (IA3Adapter.recipe, or its model card's)

    @classmethod
    def of(cls, adapter: IA3Adapter) -> Provenance:
        recipe = adapter.recipe.plain() if adapter.recipe is not None else _card_recipe(adapter.source)
        return cls(_version(), adapter.name, adapter.source, adapter.base_model, recipe)

    def gguf_metadata(self) -> dict[str, str]:
        """GGUF string keys (those of `GGUF_KEYS` that apply); the recipe as compact JSON."""
        out = {"ia3fuse.version": self.version, "ia3fuse.adapter.name": self.adapter}
        if self.adapter_path:
            out["ia3fuse.adapter.path"] = self.adapter_path
        if self.base_model:
            out["ia3fuse.adapter.base_model"] = self.base_model
        if self.recipe is not None:
            out["ia3fuse.recipe"] = json.dumps(self.recipe, sort_keys=True, separators=(",", ":"))
        return out

    def card_section(self, base: str, changed: str) -> str:
        """The model card's ia3fuse section (markdown); ``changed`` says what the fold changed."""
        where = f" from `{self.adapter_path}`" if self.adapter_path else ""
        trained = f"`{self.base_model}`" if self.base_model else "(not recorded)"
        lines = [
            CARD_HEADING,
            "",
            f"The IA3 adapter `{self.adapter}` is folded into the weights of `{base}`: the model runs without PEFT.",
            "",
            f"- adapter: `{self.adapter}`{where}",
            f"- adapter trained on (its `base_model_name_or_path`): {trained}",
            f"- fold: {changed}",
            f"- ia3fuse: {self.version} (`ia3fuse.fold_checkpoint`)",
        ]
        if self.recipe is None:
            lines.append("- fusion recipe: none recorded (the adapter was not fused by ia3fuse)")
        else:
            lines += [
                "",
                "### Fusion recipe",
                "",
                "```yaml",
                yaml.safe_dump(self.recipe, sort_keys=False).rstrip(),
                "```",
            ]
        return "\n".join(lines) + "\n"


def model_card(base_card: Optional[str], section: str, title: str) -> str:
    """The output's ``README.md``: the base's card, unchanged, with ``section`` appended; or a new card.

    The base card's content (its YAML front matter included) stays as it was, so a card that is
    folded again gains one section per fold.
    """
    if base_card is not None and base_card.strip():
        return base_card.rstrip("\n") + "\n\n" + section
    return f"---\ntags:\n- ia3\n- ia3fuse\n---\n\n# {title}\n\n{section}"
