"""Prefect flows that wire Kiln's stages together (no stage logic here), and the `kiln` CLI."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / "configs" / "tiny.yaml")
