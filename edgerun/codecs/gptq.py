"""GPTQ helpers shared by the encoders of spqr, cluster and bitstack (pack time, NumPy)."""
from __future__ import annotations

import numpy as np


def inverse_cholesky(H: np.ndarray, percdamp: float):
    """Upper Cholesky factor U of (H + damp·I)⁻¹ (GPTQ), after zeroing dead inputs: -> U, dead."""
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.abs(np.diag(H)))
    Linv = np.linalg.inv(np.linalg.cholesky(H))
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T.copy(), dead
