"""Lightning callbacks: Memory Layer diagnostics (bucket usage, gradient coverage), the TensorBoard overview
and HParams, and training safety nets."""

from mf_lightning.callbacks.bucket_usage import BucketUsageMonitor
from mf_lightning.callbacks.evaluation_results import CheckpointStep, EvaluationLogger
from mf_lightning.callbacks.first_screen import FlopsModelSummary, StepProgressBar
from mf_lightning.callbacks.gradient_coverage import GradientCoverageMonitor
from mf_lightning.callbacks.hparams import HParamsSummary
from mf_lightning.callbacks.non_finite import NonFiniteGuard, NonFiniteTrainingError
from mf_lightning.callbacks.preemption import PreemptionCheckpoint
from mf_lightning.callbacks.shared_folder import SharedFolderCheck
from mf_lightning.callbacks.tensorboard_layout import OverviewLayout
from mf_lightning.callbacks.validation_schedule import ValidationSchedule

__all__ = [
    "BucketUsageMonitor",
    "CheckpointStep",
    "EvaluationLogger",
    "FlopsModelSummary",
    "GradientCoverageMonitor",
    "HParamsSummary",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "OverviewLayout",
    "PreemptionCheckpoint",
    "SharedFolderCheck",
    "StepProgressBar",
    "ValidationSchedule",
]
