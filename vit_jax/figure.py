"""Pictures: matplotlib set up once, headless, at one resolution, for every command that draws.

Figures are sized in pixels (`figsize(width, height)`) and saved without bbox_inches="tight", so a
PNG has exactly the size its command says. matplotlib is imported on the first picture, not with
this module: it takes a second, which a training run spends only at its end, when it draws its curves.
"""

import os

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def figsize(width_px: int, height_px: int) -> tuple[float, float]:
    """matplotlib's figsize (inches) for a picture of this many pixels at DPI."""
    return width_px / DPI, height_px / DPI


def subplots(*args, **kwargs):
    """matplotlib.pyplot.subplots on the headless backend: (figure, axes)."""
    return _pyplot().subplots(*args, **kwargs)


def output_path(out: str) -> str:
    """The file that matplotlib's savefig writes for `out`: a name without an extension gets '.png'."""
    return out if os.path.splitext(out)[1][1:] else out.rstrip(".") + ".png"


def save(fig, out: str) -> str:
    """Writes the figure at `out` (a PNG unless its extension names another format; creating its folder)
    and closes it; returns the path written, which the commands report."""
    path = output_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path
