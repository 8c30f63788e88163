"""Search spaces, elastic supernets, subnet extraction and supernet training.

Names resolve on first use (as in `nestnas`), so that the family registry
(`nestnas.supernet.families`) loads without torch.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_FAMILY": "families", "SUPERNETS": "families", "family_names": "families",
    "register_supernet": "families", "unregister_supernet": "families", "supernet_class": "families",
    "Supernet": "base", "build_supernet": "base", "part_key": "base",
    "SearchSpace": "space", "Variable": "space", "SubnetConfig": "config",
    "CNNConfig": "cnn", "CNNSpace": "cnn", "ElasticCNN": "cnn", "StageSpec": "cnn",
    "ElasticTransformer": "transformer", "TransformerConfig": "transformer", "TransformerSpace": "transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"nestnas.supernet.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nestnas.supernet' has no attribute {name!r}")


def __dir__():
    return __all__
