"""The bundled trained model, shipped as package data so that ``pip install .`` (not only an editable
install) runs the main command: :func:`default_model` finds it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

NAME = "dsa-mini"


def default_model() -> str | None:
    """The directory of the bundled model, or None when this installation does not carry it."""
    p = Path(str(resources.files(__name__) / NAME))
    return str(p) if (p / "config.json").is_file() else None


__all__ = ["NAME", "default_model"]
