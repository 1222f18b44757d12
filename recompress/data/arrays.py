"""The arrays of a prepared dataset folder, read with one clear error where a file is missing or damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recompress.errors import UserError

FIX = "prepare the dataset again (recompress data ...)"


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    """``path`` (a .npy file), memory-mapped read-only or read whole."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the dataset is incomplete", FIX) from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied)", "give this user read access to it") from None
    except (ValueError, OSError, EOFError) as e:  # truncated ("mmap length is greater than file size"), not .npy
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is damaged or truncated ({first})", FIX) from None
