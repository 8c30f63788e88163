"""The registry of supernet families by name (timm-style `register_model`).

A family is one module that defines a `SubnetConfig`, a `SearchSpace` and a `Supernet` subclass
and decorates the supernet with `@register_supernet("name")`. Everything outside `supernet/`
reaches families through this registry only. This module imports neither torch nor the families,
so the command line can list and default family names without loading them; a built-in family is
imported the first time it is looked up.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

from nestnas.errors import ConfigError

#: The family used when none is named (the command line's --family default, the quickstart).
DEFAULT_FAMILY = "cnn"

# Built-in families: name -> module that registers it on import.
_BUILTIN = {"cnn": "nestnas.supernet.cnn", "transformer": "nestnas.supernet.transformer",
            "hf-encoder": "nestnas.supernet.hf_encoder"}
#: Environment variable naming modules (comma-separated) that register families of the user's:
#: the command line imports them before it looks a family up.
PLUGINS_ENV = "NESTNAS_FAMILIES"
#: Entry-point group through which an installed package can register families the same way.
ENTRY_POINT_GROUP = "nestnas.families"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the family modules named by `NESTNAS_FAMILIES` and the `nestnas.families` entry
    points, once. A module that fails to import is reported on stderr in one line and skipped,
    so one broken plugin does not take the command line down."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import os
    import sys
    from importlib.metadata import entry_points

    modules = [("$" + PLUGINS_ENV, m.strip()) for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    modules += [(f"entry point {ep.name!r}", ep.value.split(":")[0]) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for source, module in modules:
        try:
            import_module(module)
        except Exception as exc:  # noqa: BLE001  (a plugin's own bug must not crash nestnas)
            first = (str(exc).splitlines() or [""])[0]
            print(f"warning: {source}: family module {module!r} does not import ({type(exc).__name__}: {first})",
                  file=sys.stderr)


class _Registry(dict):
    """name -> class; a built-in family not imported yet is imported on first lookup, and the
    user's plugin modules are imported before a name is declared unknown."""

    def __missing__(self, family):
        if isinstance(family, str) and family in _BUILTIN:
            import_module(_BUILTIN[family])
        elif isinstance(family, str):
            load_plugins()
        if family in self:
            return dict.__getitem__(self, family)
        raise KeyError(family)


SUPERNETS: dict[str, Any] = _Registry()  # family -> Supernet subclass
SPACES: dict[str, Any] = _Registry()  # family -> SearchSpace subclass
CONFIGS: dict[str, Any] = _Registry()  # family -> SubnetConfig subclass


def register_supernet(family: str) -> Callable[[type], type]:
    """Class decorator: register a `Supernet` subclass, its `space_type` and that space's
    `config_type` under `family` (which all three must declare)."""

    def wrap(cls):
        space_type = cls.space_type
        config_type = space_type.config_type
        for what, declared in (("space_type", space_type.family), ("config_type", config_type.family)):
            if declared != family:
                raise ConfigError(f"supernet family {family!r}: its {what} declares family {declared!r}")
        cls.family = family
        SUPERNETS[family], SPACES[family], CONFIGS[family] = cls, space_type, config_type
        return cls

    return wrap


def unregister_supernet(family: str) -> None:
    """Remove a registered family (e.g. one a test defined)."""
    for table in (SUPERNETS, SPACES, CONFIGS):
        table.pop(family, None)


def family_names() -> list[str]:
    """Every family that can be looked up: the built-in ones, the user's plugin modules' and
    those registered since."""
    load_plugins()
    return sorted({*_BUILTIN, *SUPERNETS})


def _find(table: dict[str, Any], family: Any):
    try:
        return table[family] if isinstance(family, str) else None
    except KeyError:
        return None


def supernet_class(family: str):
    """The `Supernet` subclass of `family` (`ConfigError` naming the known families if none)."""
    cls = _find(SUPERNETS, family)
    if cls is None:
        raise ConfigError(f"unknown supernet family {family!r}; allowed: {family_names()}")
    return cls


def space_class(family: str):
    """The `SearchSpace` subclass of `family`, or None."""
    return _find(SPACES, family)


def config_class(family: str):
    """The `SubnetConfig` subclass of `family`, or None."""
    return _find(CONFIGS, family)
