"""Figures of merit for predictors, computed on held-out subnets."""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau


def prediction_metrics(y_true, y_pred) -> dict[str, float]:
    """RMSE, MAPE (%), Kendall tau and the share of predictions within +-10% of the truth."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.size < 2:
        raise ValueError("need at least two (truth, prediction) pairs of equal length")
    rel = np.abs(y_pred - y_true) / np.abs(y_true)
    tau = kendalltau(y_true, y_pred).statistic
    return {
        "n": int(y_true.size),
        "rmse": float(np.sqrt(np.mean((y_pred - y_true) ** 2))),
        "mape": float(100.0 * np.mean(rel)),
        "kendall_tau": float(tau) if np.isfinite(tau) else 0.0,
        "within_10pct": float(np.mean(rel <= 0.10)),
    }
