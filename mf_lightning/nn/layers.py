"""``nn.Linear`` and ``nn.Embedding`` whose own ``reset_parameters`` gives the model's initialisation.

The models initialise weights ``N(0, std**2)`` with a per-layer ``std`` and biases at zero, not torch's
defaults (Kaiming-uniform, ``N(0, 1)``). Holding the ``std`` in the layer makes its ``reset_parameters``
the one place that sets its state, so the same initialisation runs at construction and after a
meta-device build is materialised (:mod:`mf_lightning.nn.init`). State-dict keys are torch's.
"""

from __future__ import annotations

from torch import nn


class NormalLinear(nn.Linear):
    """``nn.Linear`` with weight ``N(0, std**2)`` and bias zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear's constructor calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std:g}"


class NormalEmbedding(nn.Embedding):
    """``nn.Embedding`` with weight ``N(0, std**2)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 0.02) -> None:
        self.std = std  # read by reset_parameters, which nn.Embedding's constructor calls
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std:g}"
