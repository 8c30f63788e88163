"""Numeric features of encoded configs for the regression predictors (vectorised).

Each choice becomes its option value (a kernel of 7 is 7, not index 2), set to zero where the
depth removes the block, so that removed slots carry no signal; analytic MACs and parameters
(log scale) and the number of active blocks are appended: cost grows with work, and per-layer
overhead grows with depth.
"""

from __future__ import annotations

import numpy as np

from nestnas.errors import ConfigError
from nestnas.predictors.macs import count_macs_encoded
from nestnas.supernet.space import SearchSpace


def check_encoded(space: SearchSpace, X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != space.n_var:
        raise ConfigError(f"encoded configs must have shape (n, {space.n_var}), got {X.shape}")
    if not np.issubdtype(X.dtype, np.integer):
        if not np.all(np.isfinite(X)) or not np.all(X == np.round(X)):
            raise ConfigError("encoded configs must be integers (indices into each choice)")
        X = X.astype(np.int64)
    if np.any(X < 0) or np.any(X > space.upper_bounds()):
        raise ConfigError("encoded configs hold an index outside its choice's range")
    return X


def active_mask(space: SearchSpace, X: np.ndarray) -> np.ndarray:
    """(n, n_var) booleans: False where the depth choice removes the slot of that variable
    (read from the variables' structure: `Variable.stage`, `slot` and `depth`)."""
    variables = space.variables()
    mask = np.ones(X.shape, dtype=bool)
    depth_col = {v.stage: j for j, v in enumerate(variables) if v.depth}
    for j, v in enumerate(variables):
        if v.slot is not None:
            c = depth_col[v.stage]
            mask[:, j] = v.slot < np.asarray(variables[c].options)[X[:, c]]
    return mask


def active_slots(space: SearchSpace, mask: np.ndarray) -> np.ndarray:
    """Number of active (stage, slot) pairs of each config: its blocks or layers."""
    variables = space.variables()
    slots: dict[tuple, list[int]] = {}
    for j, v in enumerate(variables):
        if v.slot is not None:
            slots.setdefault((v.stage, v.slot), []).append(j)
    if not slots:
        return np.zeros(len(mask))
    return np.stack([mask[:, cols].any(axis=1) for cols in slots.values()], 1).sum(axis=1).astype(np.float64)


def option_values(space: SearchSpace, X: np.ndarray) -> np.ndarray:
    """Option value of every choice, as the family shows it (`SearchSpace.option_values`)."""
    return space.option_values(X)


def config_features(space: SearchSpace, X, spec: dict) -> np.ndarray:
    X = check_encoded(space, X)
    values = option_values(space, X)
    mask = active_mask(space, X)
    macs, params = count_macs_encoded(space, X, **spec)
    blocks = active_slots(space, mask)
    return np.column_stack([values * mask, np.log(macs.astype(np.float64)), np.log(params.astype(np.float64)),
                            blocks])


def nesting_features(space: SearchSpace, X) -> np.ndarray:
    """Share of active choices at their smallest and at their largest option. A supernet trained
    with the sandwich rule trains the smallest and largest subnets every step, so subnets near
    either end of the nested order are better trained than mixed ones; accuracy depends on this
    as much as on capacity."""
    X = check_encoded(space, X)
    mask = active_mask(space, X)
    top = space.upper_bounds()[None, :]
    n = np.maximum(mask.sum(axis=1), 1)
    return np.column_stack([((X == 0) & mask).sum(axis=1) / n, ((X == top) & mask).sum(axis=1) / n])
