"""Periodic shuffle between the 6·r³ channels of an LR position and its r×r×r HR block.

Convention (the authors'): HR offset (i, j, k) of tensor component c lives in channel
``c·r³ + i + r·j + r²·k``, where i runs along the first spatial axis.
"""

from __future__ import annotations

import torch


def periodic_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, C·r³, X, Y, Z)`` → ``(B, C, r·X, r·Y, r·Z)``."""
    b, cr3, nx, ny, nz = x.shape
    c = cr3 // r**3
    if c * r**3 != cr3:
        raise ValueError(f"{cr3} channels are not a multiple of r³ = {r**3}")
    # channel index = c·r³ + k·r² + j·r + i  →  axes (c, k, j, i)
    x = x.reshape(b, c, r, r, r, nx, ny, nz)  # (b, c, k, j, i, X, Y, Z)
    x = x.permute(0, 1, 5, 4, 6, 3, 7, 2)  # (b, c, X, i, Y, j, Z, k)
    return x.reshape(b, c, nx * r, ny * r, nz * r)


def periodic_unshuffle(y: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`periodic_shuffle`: ``(B, C, r·X, r·Y, r·Z)`` → ``(B, C·r³, X, Y, Z)``."""
    b, c, hx, hy, hz = y.shape
    if hx % r or hy % r or hz % r:
        raise ValueError(f"spatial shape {(hx, hy, hz)} is not a multiple of r = {r}")
    nx, ny, nz = hx // r, hy // r, hz // r
    y = y.reshape(b, c, nx, r, ny, r, nz, r)  # (b, c, X, i, Y, j, Z, k)
    y = y.permute(0, 1, 7, 5, 3, 2, 4, 6)  # (b, c, k, j, i, X, Y, Z)
    return y.reshape(b, c * r**3, nx, ny, nz)
