"""Search objectives: what a candidate fusion scores on a batch (lower is better)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from ..errors import DataError, InvalidParameterError
from .data import Batch, model_family

__all__ = ["OBJECTIVES", "resolve_objective", "ObjectiveFn", "prediction_logits", "collapse_notes", "agreement_notes"]

ObjectiveFn = Callable[[Any, Batch], Tensor]
OBJECTIVES = ("loss", "entropy")


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        raise DataError(
            "the model returns no logits, so objective 'loss'/'entropy' cannot score it; "
            "pass objective=callable(model, batch) -> scalar tensor"
        )
    return logits


def mean_loss(model: Any, batch: Batch) -> Tensor:
    """The model's own mean loss on the labeled batch (causal LMs: target tokens only)."""
    output = model(**batch.model_inputs)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise DataError(
            f"{type(model).__name__} returned no loss for the batch; pass labeled examples "
            "(targets or labels), or a user objective"
        )
    return loss


def prediction_logits(model: Any, batch: Batch) -> Tensor:
    """The logits the entropy objective scores, one row per example: the class distribution
    (classifiers), the next token after each prompt (causal LMs: the first answer token), the
    decoder's first token (seq2seq). Labels are ignored."""
    family = model_family(model)
    inputs = {k: v for k, v in batch.model_inputs.items() if k != "labels"}
    if family == "seq2seq" and "decoder_input_ids" not in inputs:
        start = getattr(model.config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full(
            (batch.size, 1), start, dtype=torch.long, device=inputs["input_ids"].device
        )
    logits = _logits(model(**inputs))
    if family == "causal":
        if batch.prompt_end is None:
            raise DataError(
                "the entropy objective on a causal LM needs to know where prompts end; pass text records, or give each "
                "ready batch a 'prompt_end' tensor (index of each row's last prompt token)"
            )
        logits = logits[torch.arange(logits.shape[0], device=logits.device), batch.prompt_end]
    elif family == "seq2seq":
        logits = logits[:, 0]
    return logits


def prediction_entropy(model: Any, batch: Batch) -> Tensor:
    """Mean entropy of the model's prediction (AdaMerging's unlabeled objective), on
    `prediction_logits`."""
    logits = prediction_logits(model, batch)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def resolve_objective(objective: Union[str, Callable[..., Tensor]]) -> tuple[str, ObjectiveFn]:
    """The objective's name and a function ``(model, Batch) -> scalar``.

    A user callable receives ``(model, inputs)`` where ``inputs`` are the batch's keyword
    arguments (already on the model's device).
    """
    if callable(objective):
        fn = objective
        return getattr(fn, "__name__", "custom"), lambda model, batch: fn(model, batch.inputs)
    if objective == "loss":
        return "loss", mean_loss
    if objective == "entropy":
        return "entropy", prediction_entropy
    raise InvalidParameterError(
        f"objective={objective!r} is not an objective; pass one of {', '.join(OBJECTIVES)} or a callable(model, inputs) -> tensor"
    )


def collapse_notes(
    before: Mapping[str, Sequence[Any]], after: Mapping[str, Sequence[Any]], *, share: float = 0.9
) -> list[str]:
    """Groups (tasks) whose predictions collapsed onto one answer: after the search, one answer
    takes at least ``share`` of the group's predictions where before (the base model) none did.
    Minimising entropy rewards confident predictions, and predicting one class for every input is
    the most confident of all; this is how that failure shows without labels.

    Args:
        before, after: group -> the predicted answer (argmax) of each of its examples.

    Example:
        >>> collapse_notes({"t": [0, 1, 2, 1]}, {"t": [1, 1, 1, 1]})  # doctest: +ELLIPSIS
        ["task 't': 4 of 4 predictions are the same answer after the search (at most 2 of 4 before)..."]
    """
    notes = []
    for group, answers in after.items():
        preds, old = list(answers), list(before.get(group, []))
        if len(preds) < 3:
            continue
        top = max(preds.count(p) for p in set(preds))
        old_top = max((old.count(p) for p in set(old)), default=0)
        if top >= share * len(preds) and old_top < share * len(old):
            notes.append(
                f"task {group!r}: {top} of {len(preds)} predictions are the same answer after the search (at most "
                f"{old_top} of {len(old)} before): the entropy objective may have collapsed this task onto one answer; "
                "check it with a few labels, or use the loss objective"
            )
    return notes


def agreement_notes(
    experts: Mapping[str, Mapping[str, Sequence[Any]]], after: Mapping[str, Sequence[Any]], *, least: float = 0.5
) -> list[str]:
    """Groups (tasks) whose answers after the search agree with no single adapter on at least
    ``least`` of the examples. A fusion is meant to answer a task as the adapter trained for it
    does; when it agrees with none of them, the entropy objective has made it confident in
    something else (wrong answers need not be one answer, so `collapse_notes` cannot see this).

    Args:
        experts: adapter name -> group -> that adapter's answer for each example.
        after: group -> the fusion's answer for each example.

    Example:
        >>> agreement_notes({"a": {"t": [1, 2, 3, 4]}, "b": {"t": [4, 3, 2, 1]}}, {"t": [0, 0, 3, 0]})  # doctest: +ELLIPSIS
        ["task 't': the fusion's answers agree with no single adapter on more than 25% of its 4 examples..."]
    """
    notes = []
    for group, answers in after.items():
        preds = list(answers)
        if len(preds) < 3 or not experts:
            continue
        rates = {
            name: sum(p == q for p, q in zip(preds, own.get(group, []))) / len(preds) for name, own in experts.items()
        }
        closest = max(rates, key=lambda n: rates[n])
        if rates[closest] < least:
            notes.append(
                f"task {group!r}: the fusion's answers agree with no single adapter on more than {rates[closest]:.0%} of "
                f"its {len(preds)} examples (closest: {closest}): the entropy objective may have made it confident in "
                "answers no adapter gives; check it with a few labels, or use the loss objective"
            )
    return notes
