"""Search spaces, elastic supernets, subnet extraction and supernet training."""

from nestnas.supernet.base import SUPERNETS, Supernet, build_supernet, register_supernet
from nestnas.supernet.cnn import ElasticCNN
from nestnas.supernet.config import CNNConfig, SubnetConfig, TransformerConfig
from nestnas.supernet.space import CNNSpace, SearchSpace, StageSpec, TransformerSpace
from nestnas.supernet.transformer import ElasticTransformer

__all__ = [
    "SUPERNETS", "CNNConfig", "CNNSpace", "ElasticCNN", "ElasticTransformer", "SearchSpace", "StageSpec",
    "SubnetConfig", "Supernet", "TransformerConfig", "TransformerSpace", "build_supernet", "register_supernet",
]
