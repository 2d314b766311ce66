"""The refusal of a fold whose adapter does not fit the model: said once, with a count and examples.

An adapter trained on another base model misfits nearly every module the same way; listing each
one repeats the same diagnosis. The streaming checkpoint fold and the GGUF fold both build their
message here, so the two say it alike.
"""

from __future__ import annotations

from typing import Optional

from .._text import summarize

__all__ = ["refusal"]


def _misfit_sentence(misfits: list[str], modules: int, where: str, trained_on: Optional[str]) -> str:
    n = len(misfits)
    if modules == 1:
        head = f"the adapter's module does not fit {where}: {misfits[0]}"
    else:
        verb = "does" if n == 1 else "do"
        examples = " and ".join(misfits[:2])
        head = f"{n} of the adapter's {modules} modules {verb} not fit {where}: {'e.g. ' if n > 2 else ''}{examples}"
    base = f" ({trained_on!r}, as its adapter_config.json records)" if trained_on else ""
    return (
        f"{head}; the adapter was trained on another base model{base}: fold it into that base, or use an adapter "
        "trained on this one"
    )


def refusal(
    target: str,
    *,
    misfits: list[str],
    problems: list[str],
    modules: int,
    where: str,
    trained_on: Optional[str],
) -> Optional[str]:
    """The message refusing a fold, or None when there is nothing to refuse.

    Args:
        target: what the fold writes into, e.g. ``"this checkpoint"``.
        misfits: one short note per adapter module that does not fit (absent, or of another size),
            ``"'path' (why)"``, in the adapter's order: counted, and two shown.
        problems: every other problem, each a full sentence: the first five shown.
        modules: how many modules the adapter has.
        where: the model the modules were matched against, e.g. ``"the file (GGUF architecture 'llama')"``.
        trained_on: the adapter's ``base_model_name_or_path``, if recorded.

    Example:
        >>> refusal("this checkpoint", misfits=["'a' (absent)"], problems=[], modules=4, where="the model",
        ...         trained_on=None)
        "cannot fold the adapter into this checkpoint: 1 of the adapter's 4 modules does not fit the model: 'a' (absent); the adapter was trained on another base model: fold it into that base, or use an adapter trained on this one"
    """
    parts = [_misfit_sentence(misfits, modules, where, trained_on)] if misfits else []
    parts += [summarize(problems)] if problems else []
    return f"cannot fold the adapter into {target}: {'; '.join(parts)}" if parts else None
