"""Where pictures go: output paths checked before any work, matplotlib loaded on demand."""

from __future__ import annotations

from pathlib import Path

from ..budget import check_memory
from ..lang.checks import PatternArgumentError

#: Picture formats, chosen by the output file's suffix.
SUFFIXES = (".png", ".svg", ".pdf")


class DrawError(RuntimeError):
    """A drawing tool (matplotlib, graphviz's ``dot``) is missing or failed."""


def output_path(where: str, path) -> Path:
    """``path`` as a ``Path`` after checking that a picture can be written there: its
    suffix names a format (``.png``, ``.svg``, ``.pdf``), it is not a directory, and no
    file stands where a parent directory has to be."""
    try:
        path = Path(path)
    except TypeError:
        raise PatternArgumentError(f"{where}: argument 'path' must be a file path, got {path!r}") from None
    if path.is_dir():
        raise PatternArgumentError(f"{where}: the output path {str(path)!r} is a directory")
    if path.suffix.lower() not in SUFFIXES:
        raise PatternArgumentError(
            f"{where}: the output path must end in .png, .svg or .pdf (the format is chosen by "
            f"the suffix), got {str(path)!r}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PatternArgumentError(
                    f"{where}: cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")
            break
    return path


def pyplot(where: str):
    """``matplotlib.pyplot`` on a non-interactive backend, or :class:`DrawError` saying how
    to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DrawError(
            f"{where} needs matplotlib, which is not installed: pip install matplotlib "
            f"(or pip install 'sparsedsl[draw]')") from err
    return plt


def check_canvas(where: str, size: tuple[float, float], dpi: int) -> None:
    """Refuse a figure of ``size`` inches at ``dpi`` whose RGBA canvas would exceed the
    memory budget, before matplotlib allocates it."""
    width, height = round(size[0] * dpi), round(size[1] * dpi)
    check_memory(where, f"a {width:,} x {height:,}-pixel canvas (dpi={dpi})", 4 * width * height)


def save(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (parents created; SVG text kept as text) and close it."""
    plt = pyplot("saving a picture")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with plt.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
            fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path
