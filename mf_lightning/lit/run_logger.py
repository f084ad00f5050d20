"""``RunLogger``: the TensorBoard logger of an ``mf`` run, without Lightning's ``epoch`` scalar."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger

EPOCH = "epoch"
"""The scalar Lightning adds to every metric a LightningModule logs (``LoggerConnector.log_metrics``)."""


class RunLogger(TensorBoardLogger):
    """A ``TensorBoardLogger`` that leaves out Lightning's ``epoch`` scalar.

    An ``mf`` run is bounded by optimizer steps and its epochs are only the sampler's, so that curve says
    nothing; and TensorBoard's Time Series tab, which opens its first two groups in character order, would
    open on it before the loss (see ``mf_lightning.lit.module.metric_tag``).
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != EPOCH}, step)
