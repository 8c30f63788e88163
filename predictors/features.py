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
from nestnas.supernet.space import CNNSpace, SearchSpace, TransformerSpace


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
    """(n, n_var) booleans: False where the depth choice removes the slot of that variable."""
    mask = np.ones(X.shape, dtype=bool)
    names = [v.name for v in space.variables()]
    if isinstance(space, CNNSpace):
        depth_cols = [names.index(f"depths[{i}]") for i in range(len(space.stages))]
        depths = np.stack([np.asarray(space.stages[i].depth_choices)[X[:, c]] for i, c in enumerate(depth_cols)], 1)
        for j, name in enumerate(names):
            if name.startswith(("kernel_sizes", "expand_ratios")):
                stage, block = (int(t) for t in name[name.index("[") + 1 : -1].split("]["))
                mask[:, j] = block < depths[:, stage]
    elif isinstance(space, TransformerSpace):
        depth = np.asarray(space.depth_choices)[X[:, names.index("depth")]]
        for j, name in enumerate(names):
            if name.startswith(("num_heads", "mlp_ratios")):
                mask[:, j] = int(name[name.index("[") + 1 : -1]) < depth
    return mask


def option_values(space: SearchSpace, X: np.ndarray) -> np.ndarray:
    """Option value of every choice; CNN kernels as their effective size (see `canonical`)."""
    variables = space.variables()
    values = np.stack([np.asarray(v.options, dtype=np.float64)[X[:, j]] for j, v in enumerate(variables)], 1)
    if isinstance(space, CNNSpace):
        res_col = [v.name for v in variables].index("resolution")
        for j, v in enumerate(variables):
            if v.name.startswith("kernel_sizes"):
                stage, block = (int(t) for t in v.name[v.name.index("[") + 1 : -1].split("]["))
                table = np.array([[space.effective_kernel(k, space.block_input_sizes(r)[stage][block])
                                   for k in space.kernel_choices] for r in space.resolution_choices], dtype=np.float64)
                values[:, j] = table[X[:, res_col], X[:, j]]
    return values


def config_features(space: SearchSpace, X, spec: dict) -> np.ndarray:
    X = check_encoded(space, X)
    values = option_values(space, X)
    mask = active_mask(space, X)
    macs, params = count_macs_encoded(space, X, **spec)
    blocks = mask.sum(axis=1) / 2.0  # two variables per block or layer slot
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
