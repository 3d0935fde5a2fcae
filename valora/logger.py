"""valora's one logger factory."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """Return a child of the ``valora`` logger (configure handlers on ``logging.getLogger('valora')``)."""
    return logging.getLogger(name if name.startswith("valora") else f"valora.{name}")
