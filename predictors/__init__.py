"""Cost and quality predictors: analytic MAC and parameter counts, latency and accuracy predictors."""

from nestnas.predictors.latency import LATENCY_KINDS, AccuracyPredictor, LatencyPredictor
from nestnas.predictors.macs import count_macs, count_macs_encoded, count_module, onnx_macs
from nestnas.predictors.metrics import prediction_metrics
from nestnas.predictors.store import load_predictor, save_predictor

__all__ = ["LATENCY_KINDS", "AccuracyPredictor", "LatencyPredictor", "count_macs", "count_macs_encoded",
           "count_module", "load_predictor", "onnx_macs", "prediction_metrics", "save_predictor"]
