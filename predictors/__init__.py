"""Cost and quality predictors: analytic MAC and parameter counts (latency and accuracy predictors follow)."""

from nestnas.predictors.macs import count_macs, count_macs_encoded, count_module, onnx_macs

__all__ = ["count_macs", "count_macs_encoded", "count_module", "onnx_macs"]
