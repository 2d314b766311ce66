"""``ia3fuse demo``: a tiny model, three IA3 adapters, every method, checked in PEFT."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .errors import IA3FuseError
from ._tiny_models import TINY_ARCHS, random_ia3_adapter, tiny_model, tiny_tokenizer
from ._text import format_table

__all__ = ["run_demo", "build_demo_files", "DEMO_ADAPTERS"]

DEMO_ADAPTERS = ("task_a", "task_b", "task_c")

# Parameters for the demo rows: the defaults, with densities that keep half of 16-64 entries.
_DEMO_PARAMS: dict[str, dict[str, Any]] = {"ties": {"density": 0.5}, "svd": {"svd_rank": 2}}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 8), generator=gen)
    batch = {"input_ids": ids}
    if arch == "t5":
        batch["decoder_input_ids"] = ids[:, :4]
    return batch


def _output(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def build_demo_files(workdir: Path, *, arch: str = "llama") -> tuple[Any, Path, list[Path]]:
    """The tiny base model (saved with its character-level tokenizer) and three random IA3
    adapters under ``workdir``; files already there are reused.

    Returns:
        (the base model in memory, its folder, the adapter folders). ``task_c`` targets only
        the attention modules, so identity fill matters for it.
    """
    if arch not in TINY_ARCHS:
        raise IA3FuseError(f"--arch {arch!r} is not a built-in tiny model; choose one of {', '.join(TINY_ARCHS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = tiny_model(arch)
    base_dir = workdir / f"tiny-{arch}"
    if not (base_dir / "config.json").exists():
        base.save_pretrained(str(base_dir))
    if not (base_dir / "tokenizer.json").exists():
        tiny_tokenizer().save_pretrained(str(base_dir))
    adapter_dirs = []
    for i, name in enumerate(DEMO_ADAPTERS):
        path = workdir / "adapters" / name
        if not path.exists():
            targets = None if i < 2 else _attention_only(base)
            random_ia3_adapter(
                base,
                path,
                seed=i + 1,
                target_modules=targets,
                feedforward_modules=[] if targets else None,
                base_name=str(base_dir),
            )
        adapter_dirs.append(path)
    return base, base_dir, adapter_dirs


def run_demo(workdir: Path, *, arch: str = "llama") -> str:
    """Build everything under ``workdir``, fuse with every method, load each result in PEFT.

    Returns:
        A report: one row per method with its parameters, the time the merge took, whether
        PEFT loaded the result, and how far the fused model's outputs move from the base's.
    """
    workdir = Path(workdir)
    base, base_dir, adapter_dirs = build_demo_files(workdir, arch=arch)  # checks arch before PEFT's import noise
    from peft import PeftModel

    from . import merge, methods

    batch = _inputs(arch)
    ref = _output(base, batch)
    (workdir / "fused").mkdir(exist_ok=True)
    rows = []
    for spec in methods():
        params = dict(_DEMO_PARAMS.get(spec.name, {}))
        start = time.perf_counter()
        fused = merge(adapter_dirs, [0.4, 0.3, 0.3], spec.name, **params)
        took = (time.perf_counter() - start) * 1e3
        out_dir = workdir / "fused" / spec.name
        fused.save(out_dir, overwrite=True)
        peft_model = PeftModel.from_pretrained(tiny_model(arch), str(out_dir)).eval()
        # PEFT's submodules read as Tensor | Module (nn.Module.__getattr__): the ignore
        loaded = all(
            torch.equal(peft_model.base_model.model.get_submodule(p).ia3_l["default"].detach().reshape(v.shape), v)  # type: ignore[union-attr,index]
            for p, v in fused.vectors.items()
        )
        moved = (_output(peft_model, batch) - ref).norm() / ref.norm()
        shown = {**{p.name: p.default for p in spec.params if p.name in ("density", "svd_rank")}, **params}
        rows.append(
            [
                spec.name,
                ", ".join(f"{k}={v}" for k, v in shown.items()) or "-",
                f"{took:.1f}",
                "yes" if loaded else "NO",
                f"{moved:.4f}",
            ]
        )
    table = format_table(["method", "parameters", "merge ms", "PEFT loads it", "output change vs base"], rows)
    return (
        f"ia3fuse demo: tiny {arch}, 3 IA3 adapters (task_c lacks the feed-forward modules), weights 0.4/0.3/0.3\n"
        f"files under {workdir.resolve()}\n\n{table}\n\n{_peft_comparison(arch, adapter_dirs)}\n\n"
        f"Inspect one: ia3fuse inspect {workdir / 'fused' / 'ties'}"
    )


def _peft_comparison(arch: str, adapter_dirs: list[Path]) -> str:
    """PEFT's own add_weighted_adapter next to ia3fuse's linear merge, missing='zero' and 'identity'."""
    from peft import PeftModel

    from . import adapter_from_peft, merge

    weights = [0.4, 0.3, 0.3]
    model = PeftModel.from_pretrained(tiny_model(arch), str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapter_dirs))], weights, "peft")
    theirs = adapter_from_peft(model, "peft").vectors
    zero = merge(adapter_dirs, weights, "linear", missing="zero").vectors
    ident = merge(adapter_dirs, weights, "linear").vectors
    same = all(torch.equal(theirs[p].reshape(v.shape), v) for p, v in zero.items()) and set(theirs) == set(zero)
    lacking = [p for p, v in ident.items() if not torch.equal(v, zero[p])]
    shrink = sum(float((zero[p] / ident[p]).mean()) for p in lacking) / len(lacking) if lacking else 1.0
    return (
        f"PEFT's add_weighted_adapter == ia3fuse linear with missing='zero', bit for bit: {'yes' if same else 'NO'}\n"
        f"With identity fill (ia3fuse's default), the {len(lacking)} modules task_c lacks keep their scale; "
        f"PEFT's zero fill multiplies them by {shrink:.2f} on average."
    )


def _attention_only(model: Any) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    model_type = model.config.model_type
    return [t for t in TARGETS[model_type] if t not in FF[model_type]]
