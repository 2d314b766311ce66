"""Session fixtures: tiny transformers models and random PEFT IA3 adapters, built once; the two
quick quality suites, trained once; and the test tiers.

Every model is built from a config (no downloads) and saved under ``tmp_path_factory``; each
architecture gets three adapters with different seeds (the third targets fewer modules than
the others) and one feed-forward-only adapter for the disjoint-modules tests.

Tiers: a test that uses a trained suite (``causal_quick``, ``encoder_quick``, directly or through
another fixture) is marked ``slow`` here, so no test file has to remember it; other slow tests
carry ``@pytest.mark.slow`` themselves. ``python -m pytest -m "not slow"`` is the fast tier.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from factories import random_ia3_adapter, tiny_model

ARCHS = ("llama", "gpt2", "t5", "bert")

# Attention-side (output-side) modules PEFT's IA3 targets by default, per architecture.
ATTENTION_MODULES = {
    "llama": ["k_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "t5": ["k", "v"],
    "bert": ["key", "value"],
}
# Feed-forward (input-side) modules PEFT's IA3 targets by default, per architecture.
FEEDFORWARD_MODULES = {
    "llama": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "t5": ["wo"],
    "bert": ["output.dense"],
}

# 0.2 keeps every random IA3 value of these seeds well above 0, so geometric fusion (log l) applies.
SPREAD = 0.2


@dataclass(frozen=True)
class TinySetup:
    """One architecture: a saved base model, its adapters and a fixed input batch."""

    arch: str
    base_dir: Path
    model: Any  # loaded once from base_dir; never wrapped or changed (tests take fresh copies)
    adapters: tuple[Path, Path, Path]  # seeds 1, 2: default targets; seed 3: attention modules only
    attention_only: Path  # = adapters[2]
    feedforward_only: Path  # seed 4: feed-forward modules only
    inputs: dict[str, torch.Tensor]

    def fresh_base(self) -> Any:
        """An independent copy of the base model (PEFT injects layers into the model it wraps)."""
        return copy.deepcopy(self.model)

    @property
    def attention_modules(self) -> list[str]:
        """This architecture's attention-side IA3 module names (PEFT's defaults)."""
        return ATTENTION_MODULES[self.arch]

    def is_feedforward(self, path: str) -> bool:
        """Whether ``path`` is one of this architecture's feed-forward (input-side) IA3 modules."""
        return any(path.endswith(name) for name in FEEDFORWARD_MODULES[self.arch])

    def run(self, model: Any) -> torch.Tensor:
        """Logits (or BERT's last hidden state) of ``model`` on the fixed batch."""
        with torch.no_grad():
            out = model(**self.inputs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def _build(arch: str, root: Path) -> TinySetup:
    model = tiny_model(arch, seed=0)
    base_dir = root / "base"
    model.save_pretrained(str(base_dir))
    loaded = type(model).from_pretrained(str(base_dir)).eval()
    attention, feedforward = ATTENTION_MODULES[arch], FEEDFORWARD_MODULES[arch]
    full = [random_ia3_adapter(loaded, root / f"seed{seed}", seed=seed, spread=SPREAD) for seed in (1, 2)]
    attention_only = random_ia3_adapter(
        loaded, root / "seed3", seed=3, spread=SPREAD, target_modules=attention, feedforward_modules=[]
    )
    feedforward_only = random_ia3_adapter(
        loaded, root / "seed4", seed=4, spread=SPREAD, target_modules=feedforward, feedforward_modules=feedforward
    )
    gen = torch.Generator().manual_seed(1234)
    inputs = {"input_ids": torch.randint(0, 128, (2, 6), generator=gen)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 128, (2, 6), generator=gen)
    return TinySetup(
        arch=arch,
        base_dir=base_dir,
        model=loaded,
        adapters=(full[0], full[1], attention_only),
        attention_only=attention_only,
        feedforward_only=feedforward_only,
        inputs=inputs,
    )


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """A tiny model of each architecture with its IA3 adapters, built once per session."""
    return _build(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


# --------------------------------------------------------------------------- trained suites, tiers

# Session fixtures that train a model; every test that depends on one is slow.
TRAINED = ("causal_quick", "encoder_quick")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in TRAINED for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def causal_quick(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The quick causal quality suite, prepared (trained) once for the whole session: (suite, cache)."""
    from benchmarks.quality.causal import CausalSuite

    cache = tmp_path_factory.mktemp("causal-cache")
    suite = CausalSuite()
    suite.prepare(cache, quick=True, seed=0, progress=False)
    return suite, cache


@pytest.fixture(scope="session")
def encoder_quick(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The quick encoder quality suite, prepared (trained) once for the whole session: (suite, cache)."""
    from benchmarks.quality.encoder import EncoderSuite

    cache = tmp_path_factory.mktemp("encoder-cache")
    suite = EncoderSuite()
    suite.prepare(cache, quick=True, seed=0, progress=False)
    return suite, cache
