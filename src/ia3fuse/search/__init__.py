"""Automatic fusion weights: learn them from a few examples (loss) or unlabeled ones (entropy).

The base model is hooked once (`ia3fuse.scaling`); a candidate is one flat vector written into
the hooks, so no step re-injects IA3 or reloads the base. Adam differentiates through the
fusion method's form (`space.MethodForm`); CMA-ES searches without gradients, as LoraHub does.
Both spend one budget counted in forward passes. The result's adapter is computed by
`ia3fuse.merge` from the found weights, so its recipe reproduces it exactly.

Under ``accelerate launch`` with several processes, each process scores its share of the
batches and the objective and gradient are summed across processes.
"""

from .run import (
    Batch,
    GRANULARITIES,
    load_model,
    load_tokenizer,
    make_batches,
    OPTIMIZERS,
    read_records,
    search_weights,
    SEARCHABLE_METHODS,
    SearchResult,
)

__all__ = [
    "search_weights",
    "SearchResult",
    "load_model",
    "load_tokenizer",
    "GRANULARITIES",
    "OPTIMIZERS",
    "SEARCHABLE_METHODS",
    "Batch",
    "make_batches",
    "read_records",
]
