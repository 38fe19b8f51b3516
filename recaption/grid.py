"""The 3x3 grid that things in a frame are placed on, and the words for its cells.

A point given in 0..1 of the frame's width and height falls in one cell, (row, column) from
the top left. Each cell has a name in the scenes' ground truth ("top left", "top",
"center"), the phrase a caption uses for a thing in it ("in the top left", "at the top"),
and two phrases for that area of the frame ("in the top left corner", "the top left
corner"). The scenes, the analyzer, the fidelity parser and the Lens prompts all read them
from here, so they word a place the same way. It imports nothing of recaption.
"""

from __future__ import annotations

Cell = tuple[int, int]  # (row, column), each 0..2

# cell, its name, the phrase for a thing in it, and for its area: (where, what)
_TABLE: tuple[tuple[Cell, str, str, tuple[str, str]], ...] = (
    ((0, 0), "top left", "in the top left", ("in the top left corner", "the top left corner")),
    ((0, 1), "top", "at the top", ("along the top", "the top edge")),
    ((0, 2), "top right", "in the top right", ("in the top right corner", "the top right corner")),
    ((1, 0), "left", "on the left", ("on the left side", "the left side")),
    ((1, 1), "center", "in the center", ("in the centre", "the centre")),
    ((1, 2), "right", "on the right", ("on the right side", "the right side")),
    ((2, 0), "bottom left", "in the bottom left", ("in the bottom left corner", "the bottom left corner")),
    ((2, 1), "bottom", "at the bottom", ("along the bottom", "the bottom edge")),
    ((2, 2), "bottom right", "in the bottom right", ("in the bottom right corner", "the bottom right corner")),
)  # fmt: skip

GRID: tuple[Cell, ...] = tuple(cell for cell, *_ in _TABLE)  # row by row, from the top left
CELLS: dict[Cell, str] = {cell: name for cell, name, _, _ in _TABLE}
CELL_INDEX: dict[str, Cell] = {name: cell for cell, name in CELLS.items()}  # the reverse
POSITIONS: dict[Cell, str] = {cell: phrase for cell, _, phrase, _ in _TABLE}
AREAS: dict[Cell, tuple[str, str]] = {cell: area for cell, _, _, area in _TABLE}
PLACES: dict[str, str] = {name: POSITIONS[cell] for cell, name in CELLS.items()}
# other words a caption may use for a cell's name
SYNONYMS: dict[str, str] = {"centre": "center", "middle": "center"}


def cell_at(cx: float, cy: float) -> Cell:
    """The cell of a point given in 0..1 of the frame's width and height."""
    return (max(0, min(2, int(cy * 3))), max(0, min(2, int(cx * 3))))


def cell_of(cx: float, cy: float) -> str:
    """The name of the cell of a point ("top left")."""
    return CELLS[cell_at(cx, cy)]


def position_phrase(cx: float, cy: float) -> str:
    """How a caption says where a point is ("in the top left")."""
    return POSITIONS[cell_at(cx, cy)]


def centre_of(name: str) -> tuple[float, float]:
    """The centre of a named cell, (x, y) in 0..1 of the frame."""
    row, col = CELL_INDEX[name]
    return (col + 0.5) / 3, (row + 0.5) / 3
