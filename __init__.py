"""nestnas: hardware-aware subnetwork search over weight-sharing supernets.

The public API, re-exported here on purpose. Names resolve on first use, so that the command
line (and `import nestnas`) starts without loading torch, scikit-learn or the runtimes.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ArtifactError": "nestnas.errors", "BackendUnavailable": "nestnas.errors", "CheckpointError": "nestnas.errors",
    "ConfigError": "nestnas.errors", "ClusterError": "nestnas.errors", "NestnasError": "nestnas.errors",
    "ProfileError": "nestnas.errors",
    "SearchSpace": "nestnas.supernet.space", "SubnetConfig": "nestnas.supernet.config",
    "CNNConfig": "nestnas.supernet.config", "TransformerConfig": "nestnas.supernet.config",
    "ElasticCNN": "nestnas.supernet.cnn", "ElasticTransformer": "nestnas.supernet.transformer",
    "train_supernet": "nestnas.supernet.train", "Recipe": "nestnas.supernet.train",
    "recipe_for": "nestnas.supernet.train",
    "load_supernet": "nestnas.supernet.checkpoint",
    "save_checkpoint": "nestnas.supernet.checkpoint", "digits_loaders": "nestnas.supernet.data",
    "recalibrate_bn": "nestnas.supernet.evaluate", "subnet_accuracy": "nestnas.supernet.evaluate",
    "count_module": "nestnas.predictors.macs", "count_macs": "nestnas.predictors.macs",
    "count_macs_encoded": "nestnas.predictors.macs",
    "LatencyPredictor": "nestnas.predictors.latency", "AccuracyPredictor": "nestnas.predictors.latency",
    "load_predictor": "nestnas.predictors.store", "prediction_metrics": "nestnas.predictors.metrics",
    "DeviceProfile": "nestnas.hw_profiles.profile", "profile_device": "nestnas.hw_profiles.profiler",
    "block_table": "nestnas.hw_profiles.profiler", "speed_factor": "nestnas.hw_profiles.calibrate",
    "SpeedCalibration": "nestnas.hw_profiles.calibrate",
    "list_profiles": "nestnas.hw_profiles.devices",
    "export_onnx": "nestnas.compile.onnx_export", "get_backend": "nestnas.compile.backends",
    "get_runner": "nestnas.compile.runners",
    "ParetoFront": "nestnas.search.front", "Candidate": "nestnas.search.front", "EvalCache": "nestnas.search.cache",
    "Objective": "nestnas.search.objectives", "Budget": "nestnas.search.objectives",
    "accuracy_objective": "nestnas.search.objectives", "latency_objective": "nestnas.search.objectives",
    "macs_objective": "nestnas.search.objectives", "params_objective": "nestnas.search.objectives",
    "measured_latency_objective": "nestnas.search.objectives",
    "export": "nestnas.exporting", "load": "nestnas.exporting",
    "rewrite": "nestnas.compile.dynamic", "load_dynamic": "nestnas.compile.dynamic",
    "DynamicProgram": "nestnas.compile.dynamic", "RewriteError": "nestnas.compile.dynamic",
    "BudgetSwitch": "nestnas.compile.switch",
    "elasticize": "nestnas.supernet.hf_encoder", "load_pretrained": "nestnas.supernet.hf_encoder",
}

__all__ = sorted([*_EXPORTS, "search"]) + ["__version__"]


def __getattr__(name: str):
    if name == "search":  # the subpackage, callable as the search function
        return import_module("nestnas.search")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nestnas' has no attribute {name!r}")


def __dir__():
    return __all__
