"""``HashInput``: optional remedies for bucket collapse, applied to what a Memory Layer hashes.

A Memory Layer picks each table's row by the signs of its input chunk, so a feature whose sign is the
same for most tokens wastes its bit, and a chunk of such features sends most tokens into a few rows
(bucket collapse). The RMSNorm'ed residual stream feeding Q/K/V and ``ML_1`` is not mean-centred, and in
training its features drift far from zero mean (``benchmarks/results/ablations_cpu.md``). Two remedies,
each off by default (the paper's model), each a :class:`ModelConfig` field:

- ``hash_centering``: subtract a running mean of each input feature (an exponential moving average of
  earlier training batches, no gradient), so every bit splits the tokens about evenly. Only earlier
  batches enter the mean, so no token sees statistics of later ones. Under DDP/FSDP the batch mean is
  taken over every rank's tokens, so all ranks keep the same running mean.
- ``bucket_balance_weight``: an auxiliary loss ``weight * mean_j (mean_tokens tanh(z_j))**2`` that is 0
  when every bit is positive for half the tokens; :func:`balance_loss` sums it over the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

CENTERING_MOMENTUM = 0.05
"""Weight of the newest batch in the running mean: about the last 20 training batches count."""


class HashInput(nn.Module):
    """Identity in shape ``[..., features]``: centres a Memory Layer's input when configured.

    In training, with ``balance_weight > 0``, the latest forward's balance term is kept in
    ``balance_term`` for :func:`balance_loss` (``None`` otherwise).
    """

    def __init__(self, features: int, centering: bool = False, balance_weight: float = 0.0) -> None:
        super().__init__()
        self.centering = centering
        self.balance_weight = balance_weight
        self.register_buffer("running_mean", torch.empty(features) if centering else None)
        self.balance_term: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The running mean starts at zero: before any batch, the input is hashed as it is."""
        if self.running_mean is not None:
            nn.init.zeros_(self.running_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centering:
            centre = self.running_mean.clone()
            if self.training:
                self.running_mean.lerp_(global_batch_mean(x.detach()).to(self.running_mean.dtype), CENTERING_MOMENTUM)
            x = x - centre.to(x.dtype)
        if self.training and self.balance_weight > 0:
            self.balance_term = self.balance_weight * torch.tanh(x.float()).flatten(0, -2).mean(0).square().mean()
        elif self.balance_term is not None:  # set only when it changes, so that an eval forward has no side
            self.balance_term = None  # effect and can be the compiled region every block shares (decode_step)
        return x

    def extra_repr(self) -> str:
        return f"centering={self.centering}, balance_weight={self.balance_weight:g}"


def global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [..., features]`` over all its tokens and, when ``torch.distributed`` runs several
    processes (DDP, FSDP), over every rank's tokens: every rank then updates its running mean alike, as
    one process with the whole batch would. Summed in float32; a collective, so every rank must call it."""
    tokens = x.flatten(0, -2).float()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tokens.mean(0)
    totals = torch.cat([tokens.sum(0), tokens.new_tensor([tokens.shape[0]])])
    dist.all_reduce(totals)
    return totals[:-1] / totals[-1]


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the balance terms of the latest training forward over every ``HashInput`` of ``model``."""
    terms = [module.balance_term for module in model.modules() if isinstance(module, HashInput)]
    terms = [term for term in terms if term is not None]
    return torch.stack(terms).sum() if terms else None
