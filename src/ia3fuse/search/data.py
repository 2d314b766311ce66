"""Examples for a weight search: JSON lines or records -> checked, padded batches. No math.

A record is one of:

- ``{"input": str, "target": str}``: a labeled generation example. For a causal LM the loss
  counts the target tokens only (the prompt's labels are -100); for a seq2seq model the target
  is the decoder's labels.
- ``{"input": str, "label": int}`` (``"text"`` is accepted for ``"input"``): a labeled
  example for a sequence classifier.
- ``{"input": str}``: unlabeled, for the entropy objective.

Already-built batches (mappings of model keyword arguments, e.g. with tensors) are taken as
they are, for a user objective; an optional ``prompt_end`` tensor in one (the index of each
row's last prompt token) lets the built-in entropy objective score a causal LM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["Batch", "read_records", "make_batches", "model_family"]


@dataclass
class Batch:
    """Model keyword arguments for one forward, plus where causal-LM prompts end.

    Attributes:
        inputs: model keyword arguments (tensors are moved to the model's device); a user
            objective receives them as given, the built-in ones pass `model_inputs`.
        prompt_end: ``(B,)`` index of each row's last prompt token, for the entropy objective
            on causal LMs; None otherwise.
        size: number of examples.
    """

    inputs: dict[str, Any]
    prompt_end: Optional[Tensor] = None
    size: int = 0

    @property
    def model_inputs(self) -> dict[str, Any]:
        """``inputs`` without ``prompt_end`` (where causal prompts end is ours, not the model's)."""
        return {k: v for k, v in self.inputs.items() if k != "prompt_end"}

    def to(self, device: Any) -> "Batch":
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.inputs.items()}
        end = None if self.prompt_end is None else self.prompt_end.to(device)
        return Batch(moved, end, self.size)


def read_records(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Read a JSON-lines file of records (blank lines are skipped).

    Raises:
        DataError: the file cannot be read, or a line is not a JSON object (its number is named).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {str(path)!r} cannot be read ({exc}); pass a JSON-lines file") from None
    records = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {str(path)!r} line {no} is not valid JSON ({exc.msg}); write one JSON object per line"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f'data file {str(path)!r} line {no} holds a {type(rec).__name__}, not a JSON object such as {{"input": ..., "target": ...}}'
            )
        records.append(rec)
    return records


def model_family(model: Any) -> str:
    """``"seq2seq"``, ``"classifier"`` or ``"causal"``, from the model's config and class."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(model).__name__
    if "ForSequenceClassification" in name or "ForTokenClassification" in name:
        return "classifier"
    if "CausalLM" in name or "LMHead" in name:
        return "causal"
    return "other"


def _context_length(model: Any) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _record_kind(rec: Mapping[str, Any], i: int) -> str:
    text = rec.get("input", rec.get("text"))
    if not isinstance(text, str):
        raise DataError(
            f'example {i} has no text: give it an \'input\' (or \'text\') string, e.g. {{"input": "2+2=", "target": "4"}}; '
            f"its keys are {sorted(rec)}"
        )
    if "target" in rec:
        if not isinstance(rec["target"], str):
            raise DataError(f"example {i} has target {rec['target']!r}; a target is a string")
        return "target"
    if "label" in rec:
        if isinstance(rec["label"], bool) or not isinstance(rec["label"], int):
            raise DataError(f"example {i} has label {rec['label']!r}; a label is a class index (an integer)")
        return "label"
    return "unlabeled"


def _check_tokenizer(tokenizer: Any, model: Any) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: the tokenizer does not "
            "match the model; pass the tokenizer saved with the base model"
        )


def make_batches(
    data: Union[str, Path, Sequence[Any]],
    model: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    need_labels: bool = True,
) -> list[Batch]:
    """Check and batch ``data`` for ``model`` (right padding, attention masks).

    Args:
        data: a JSON-lines path, a list of records, or a list of ready batches (mappings of
            model keyword arguments, with at least one tensor).
        model: the base model (its config gives the family and the context length).
        tokenizer: a Hugging Face tokenizer; needed for records.
        batch_size: examples per forward pass.
        need_labels: refuse unlabeled records (the loss objective needs targets or labels).

    Raises:
        DataError: empty data, malformed or mixed records, unlabeled records for the loss,
            an example longer than the model's context, a tokenizer that does not match the
            model, labels for a model that takes none.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}; pass a positive integer")
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise DataError("the data hold no examples; pass at least one example (a JSON object per line)")
    if all(isinstance(r, Mapping) and any(isinstance(v, Tensor) for v in r.values()) for r in records):
        return [Batch(dict(r), r.get("prompt_end"), _rows(r)) for r in records]
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DataError(
                f'example {i} is a {type(r).__name__}; an example is a mapping such as {{"input": ..., "target": ...}}'
            )
    kinds = [_record_kind(r, i) for i, r in enumerate(records)]
    if len(set(kinds)) > 1:
        first = {k: kinds.index(k) for k in kinds}
        raise DataError(
            "the examples mix kinds (" + ", ".join(f"{k} from example {i}" for k, i in first.items()) + "); "
            "give every example the same fields"
        )
    kind = kinds[0]
    if kind == "unlabeled" and need_labels:
        raise DataError(
            "objective 'loss' needs labeled examples but example 0 has no 'target' or 'label'; add them, "
            "or use objective 'entropy' for unlabeled inputs"
        )
    if tokenizer is None:
        raise DataError("the examples are text: pass the base model's tokenizer (tokenizer=..., --tokenizer DIR)")
    _check_tokenizer(tokenizer, model)
    family = model_family(model)
    if kind == "label" and family != "classifier":
        raise DataError(
            f"the examples have class labels but the model is a {type(model).__name__}, not a sequence classifier; "
            'give generation examples {"input": ..., "target": ...} or load the model as a classifier'
        )
    if kind == "target" and family not in ("causal", "seq2seq"):
        raise DataError(
            f"the examples have target strings but the model is a {type(model).__name__}, not a causal or seq2seq LM; "
            'give class labels {"input": ..., "label": ...} or a user objective'
        )
    encoded = [_encode(r, kind, family, tokenizer, i) for i, r in enumerate(records)]
    context = _context_length(model)
    if context is not None:
        for i, e in enumerate(encoded):
            if len(e["input_ids"]) > context:
                raise DataError(
                    f"example {i} is {len(e['input_ids'])} tokens long but the model's context holds {context}; "
                    "shorten it or drop it"
                )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [_collate(encoded[i : i + batch_size], pad, family, model) for i in range(0, len(encoded), batch_size)]


def _rows(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode(rec: Mapping[str, Any], kind: str, family: str, tokenizer: Any, i: int) -> dict[str, Any]:
    text = rec.get("input", rec.get("text"))
    if family == "causal":
        prompt = _ids(tokenizer, text, True)
        if not prompt:
            raise DataError(f"example {i} has an empty input; give every example some text")
        if kind != "target":
            return {"input_ids": prompt, "labels": None, "prompt_end": len(prompt) - 1}
        target = _ids(tokenizer, rec["target"], False)
        if tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target, "prompt_end": len(prompt) - 1}
    ids = _ids(tokenizer, text, True)
    if family == "seq2seq":
        labels = _ids(tokenizer, rec["target"], True) if kind == "target" else None
        return {"input_ids": ids, "labels": labels, "prompt_end": None}
    return {"input_ids": ids, "labels": rec.get("label"), "prompt_end": None}


def _collate(items: list[dict[str, Any]], pad: int, family: str, model: Any) -> Batch:
    width = max(len(e["input_ids"]) for e in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, e in enumerate(items):
        ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[r, : len(e["input_ids"])] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    prompt_end = None
    if family == "causal":
        prompt_end = torch.tensor([e["prompt_end"] for e in items])
        if items[0]["labels"] is not None:
            labels = torch.full((len(items), width), -100, dtype=torch.long)
            for r, e in enumerate(items):
                labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
            inputs["labels"] = labels
    elif family == "seq2seq":
        if items[0]["labels"] is not None:
            lw = max(len(e["labels"]) for e in items)
            labels = torch.full((len(items), lw), -100, dtype=torch.long)
            for r, e in enumerate(items):
                labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
            inputs["labels"] = labels
        else:
            start = getattr(model.config, "decoder_start_token_id", None) or 0
            inputs["decoder_input_ids"] = torch.full((len(items), 1), start, dtype=torch.long)
    elif items[0]["labels"] is not None:
        inputs["labels"] = torch.tensor([e["labels"] for e in items])
    return Batch(inputs, prompt_end, len(items))
