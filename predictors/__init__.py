"""Cost and quality predictors: MAC and parameter counts (latency and accuracy predictors follow)."""

from nestnas.predictors.macs import count_module

__all__ = ["count_module"]
