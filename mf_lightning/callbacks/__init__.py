"""Lightning callbacks that watch Memory Layers train: bucket usage and gradient coverage of the tables."""

from mf_lightning.callbacks.bucket_usage import BucketUsageMonitor
from mf_lightning.callbacks.gradient_coverage import GradientCoverageMonitor

__all__ = ["BucketUsageMonitor", "GradientCoverageMonitor"]
