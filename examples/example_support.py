"""What the examples share: matplotlib as an optional extra, and saving a figure as PNG.

    plt = pyplot()              # None when matplotlib is not installed: the example skips its plot
    ...
    return save_figure(fig, path)
"""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the file-only Agg backend (no display needed), or None."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 80) -> str:
    """Lay out ``fig``, write it to ``path`` (PNG) and free it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
