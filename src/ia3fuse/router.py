"""The learned router of a mixture: a small gate on the base model's hidden states that picks
each input's mixture weights, and a plain training loop for it (`train_router`; the HF
``Trainer`` works too, with the mixture as its model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, TypedDict

import torch
from torch import Tensor, nn

from .errors import IA3FuseError, InvalidParameterError

if TYPE_CHECKING:
    from .mixture import Mixture

__all__ = ["Router", "train_router"]


class _RouterConfig(TypedDict):
    hidden_size: int
    num_adapters: int
    level: str
    layer: int
    hidden: int
    temperature: float


class Router(nn.Module):
    """A small gate from the base model's hidden states to mixture weights (softmax over K).

    Args:
        hidden_size: width of the hidden states it reads.
        num_adapters: K.
        level: ``"sequence"`` (mean-pooled over the attention mask: weights ``(B, K)``) or
            ``"token"`` (weights ``(B, T, K)``, for forwards over whole sequences).
        layer: which of the model's ``hidden_states`` it reads (default -1, the last).
        hidden: width of a hidden layer (0: a single linear map).
        temperature: softmax temperature.
    """

    def __init__(
        self,
        hidden_size: int,
        num_adapters: int,
        *,
        level: str = "sequence",
        layer: int = -1,
        hidden: int = 0,
        temperature: float = 1.0,
    ):
        super().__init__()
        if level not in ("sequence", "token"):
            raise InvalidParameterError(f"router level={level!r}; pass 'sequence' or 'token'")
        if not temperature > 0:
            raise InvalidParameterError(f"router temperature={temperature!r}; pass a value > 0")
        self.config: _RouterConfig = {
            "hidden_size": int(hidden_size),
            "num_adapters": int(num_adapters),
            "level": level,
            "layer": int(layer),
            "hidden": int(hidden),
            "temperature": float(temperature),
        }
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, num_adapters)
            )
        else:
            self.net = nn.Linear(hidden_size, num_adapters)
        last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        assert isinstance(last, nn.Linear)  # the Sequential ends in one
        nn.init.zeros_(last.weight)  # starts at uniform weights: the plain mean of the adapters
        nn.init.zeros_(last.bias)

    @property
    def level(self) -> str:
        return self.config["level"]

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        h = hidden_states.float()
        if self.level == "sequence":
            if attention_mask is None:
                h = h.mean(1)
            else:
                m = attention_mask.to(h.dtype).unsqueeze(-1)
                h = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.softmax(self.net(h) / self.config["temperature"], dim=-1)


def train_router(
    mixture: "Mixture",
    batches: Sequence[Mapping[str, Any]],
    *,
    epochs: int = 3,
    lr: float = 1e-2,
    seed: int = 0,
    objective: Optional[Any] = None,
    progress: bool = False,
) -> list[float]:
    """Train ``mixture.router`` on labeled batches with a plain torch loop (the base stays frozen).

    Each batch is model keyword arguments with ``labels`` (the model computes the loss), or
    whatever ``objective(mixture, inputs) -> scalar loss`` takes (it must call the mixture as
    its model, so routing happens). Batches are shuffled per epoch with ``seed``. For
    transformers' ``Trainer``, pass the mixture itself as the model: its only trainable
    parameters are the router's.

    Returns:
        The mean loss of each epoch.
    """
    from tqdm.auto import tqdm

    if mixture.router is None:
        raise IA3FuseError("the mixture has no router; call mixture.add_router() first")
    if not batches:
        raise IA3FuseError("no training batches; pass labeled batches (dicts with input_ids, attention_mask, labels)")
    device = mixture.basis.device
    frozen = [(p, p.requires_grad) for p in mixture.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(mixture.router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    mixture.router.train()
    try:
        for _ in tqdm(range(epochs), desc="router", disable=not progress):
            total = 0.0
            for i in torch.randperm(len(batches), generator=gen).tolist():
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batches[i].items()}
                loss = objective(mixture, batch) if objective is not None else mixture(**batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            losses.append(total / len(batches))
    finally:
        mixture.router.eval()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return losses
