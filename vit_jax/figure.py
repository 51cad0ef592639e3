"""Pictures: matplotlib set up once, headless, at one resolution, for every command that draws.

Figures are sized in pixels (`figsize(width, height)`) and saved without bbox_inches="tight", so a
PNG has exactly the size its command says.
"""

import os

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

DPI = 100


def figsize(width_px: int, height_px: int) -> tuple[float, float]:
    """matplotlib's figsize (inches) for a picture of this many pixels at DPI."""
    return width_px / DPI, height_px / DPI


def save(fig, out: str) -> str:
    """Writes the figure as a PNG at `out` (creating its folder) and closes it; returns `out`."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
