"""Helpers shipped for tests: forked multi-rank runs and tiny specs."""

from __future__ import annotations

from pathlib import Path

# The bundled text corpus (Python standard-library docstrings), used by the demo and tests.
CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
