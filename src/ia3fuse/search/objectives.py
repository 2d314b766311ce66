"""Search objectives: what a candidate fusion scores on a batch (lower is better)."""

from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import Tensor

from ..errors import DataError, InvalidParameterError
from .data import Batch, model_family

__all__ = ["OBJECTIVES", "resolve_objective", "ObjectiveFn"]

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


def prediction_entropy(model: Any, batch: Batch) -> Tensor:
    """Mean entropy of the model's prediction (AdaMerging's unlabeled objective).

    Classifiers: the class distribution. Causal LMs: the next-token distribution after each
    prompt (the first answer token). Seq2seq: the decoder's first token. Labels are ignored.
    """
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
