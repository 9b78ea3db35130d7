"""pytorch-fid, the tests' and the benchmark's reference, on SciPy releases without sqrtm(disp=).

pytorch-fid 0.3.0 computes the Frechet distance with `linalg.sqrtm(sigma1 @ sigma2, disp=False)`.
SciPy deprecated `disp` in 1.16 and later releases dropped it: on a GPU machine's newer SciPy,
pytorch-fid's function and its CLI stopped with "sqrtm() got an unexpected keyword argument
'disp'" (2026-11-26). The pipeline never calls sqrtm (ddpm.fid uses two eigh calls), but its
tests compare against pytorch-fid, so where `disp` is gone this gives it back, computed as SciPy
1.17 did. pytorch-fid's own arithmetic is untouched.

    python tests/pytorch_fid_compat.py real fake --dims 64   # = python -m pytorch_fid ...
"""
from __future__ import annotations

import inspect

import numpy as np
from scipy import linalg


def patch_sqrtm() -> None:
    """Make scipy.linalg.sqrtm accept disp= again, if this SciPy has dropped it."""
    if "disp" in inspect.signature(linalg.sqrtm).parameters:
        return
    sqrtm = linalg.sqrtm

    def sqrtm_with_disp(A, disp=True, **kwargs):
        root = sqrtm(A, **kwargs)
        if disp:
            return root
        try:  # SciPy <= 1.17's error estimate for disp=False
            error = linalg.norm(root @ root - A, "fro") ** 2 / linalg.norm(A, "fro")
        except ValueError:
            error = np.inf
        return root, error

    linalg.sqrtm = sqrtm_with_disp


patch_sqrtm()

if __name__ == "__main__":
    from pytorch_fid.fid_score import main
    main()
