"""nestnas: hardware-aware subnetwork search over weight-sharing supernets.

The public API, re-exported here on purpose; everything else is reachable through the
subpackages (`nestnas.supernet`, `nestnas.predictors`).
"""

__version__ = "0.1.0"

from nestnas.errors import ArtifactError, CheckpointError, ConfigError, NestnasError, ProfileError
from nestnas.predictors.macs import count_module
from nestnas.supernet.checkpoint import load_supernet, save_checkpoint
from nestnas.supernet.cnn import ElasticCNN
from nestnas.supernet.config import CNNConfig, SubnetConfig, TransformerConfig
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.evaluate import recalibrate_bn, subnet_accuracy
from nestnas.supernet.space import SearchSpace
from nestnas.supernet.train import train_supernet
from nestnas.supernet.transformer import ElasticTransformer

__all__ = [
    "ArtifactError", "CNNConfig", "CheckpointError", "ConfigError", "ElasticCNN", "ElasticTransformer",
    "NestnasError", "ProfileError", "SearchSpace", "SubnetConfig", "TransformerConfig", "__version__",
    "count_module", "digits_loaders", "load_supernet", "recalibrate_bn", "save_checkpoint", "subnet_accuracy",
    "train_supernet",
]
