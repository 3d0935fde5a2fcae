"""Suite-wide setup. Without a GPU, Triton kernels run in Triton's CPU interpreter; the switch must
be set before any module decorates a kernel (``triton.jit`` reads it then), so it lives here, the
first conftest pytest imports."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
