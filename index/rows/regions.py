"""Region rows: a multi-scale grid of crops of each image, stored as rows under the image's id.

A global embedding of a whole photo mixes everything in it; a query that is a part of a photo
(a crop, a box drawn on the page) matches the part far better than the whole. With regions
(``embed --regions L``, recorded in the manifest as ``Manifest.regions``) every image also gets
one vector per cell of an R-MAC-style grid (Tolias et al. 2016): at level ``l`` (2..L) square-ish
cells of ``2 / (l + 1)`` of each side, ``l`` per axis, evenly spaced so neighbours overlap by
about 40 %. Level 1 is the whole image, the image's own row. ``L`` = 2, 3, 4 give 5, 14, 30
vectors per image.

A region row's id is the image id, ``@r``, and its cell (``<id>@r3.1.2``: level 3, row 1,
column 2), so its box is known from the id alone, and everything keyed by the image id finds
them: the shard of a region row is its image's (``index.rows.sharding.shard_of``), a delete of
the image writes tombstones for its region ids too (``region_ids``), and a search collapses
region hits to their image with the best region's score, saying which region matched
(``parent_of``, ``box_of``). Ids given by writers must not contain ``@r`` (``SEPARATOR``).
"""

from __future__ import annotations

import re

SEPARATOR = "@r"
MAX_LEVELS = 6  # 91 vectors per image: already far past what pays
_REGION = re.compile(r"^(?P<parent>.+)@r(?P<level>[2-9])\.(?P<row>\d)\.(?P<col>\d)$")


def check_levels(levels: int) -> int:
    """``levels`` as an int in 1..``MAX_LEVELS`` (1: the whole image only, no region rows)."""
    levels = int(levels)
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"regions must be 1..{MAX_LEVELS} grid levels, got {levels}")
    return levels


def cells(levels: int) -> list[tuple[int, int, int]]:
    """The grid's region cells ``(level, row, col)`` beyond the whole image, coarse first."""
    return [
        (level, row, col)
        for level in range(2, check_levels(levels) + 1)
        for row in range(level)
        for col in range(level)
    ]


def per_image(levels: int) -> int:
    """Vectors stored per image with ``levels`` grid levels (the image's own row included)."""
    return 1 + len(cells(levels))


def cell_box(level: int, row: int, col: int) -> tuple[float, float, float, float]:
    """A cell's box ``(x0, y0, x1, y1)`` as fractions of the image's width and height."""
    if level == 1:
        return (0.0, 0.0, 1.0, 1.0)
    side = 2.0 / (level + 1)
    step = (1.0 - side) / (level - 1)
    x0, y0 = col * step, row * step
    return (round(x0, 4), round(y0, 4), round(x0 + side, 4), round(y0 + side, 4))


def region_id(image_id: str, level: int, row: int, col: int) -> str:
    return f"{image_id}{SEPARATOR}{level}.{row}.{col}"


def region_ids(image_id: str, levels: int) -> list[str]:
    """The ids of ``image_id``'s region rows (not its own row)."""
    return [region_id(image_id, *cell) for cell in cells(levels)]


def boxes(levels: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``(id suffix, box)`` for the image's own row (suffix "") and then each region cell: what
    the embedding job crops, in the order it writes the rows."""
    whole = [("", cell_box(1, 0, 0))]
    return whole + [(region_id("", *cell), cell_box(*cell)) for cell in cells(levels)]


def parent_of(row_id: str) -> str:
    """The image id a row belongs to (the id itself for an image's own row)."""
    if SEPARATOR not in row_id:  # the common case, without a regex
        return row_id
    match = _REGION.match(row_id)
    return match["parent"] if match else row_id


def box_of(row_id: str) -> tuple[float, float, float, float] | None:
    """The box of a region row (None for an image's own row: the whole image)."""
    if SEPARATOR not in row_id:
        return None
    match = _REGION.match(row_id)
    if match is None:
        return None
    return cell_box(int(match["level"]), int(match["row"]), int(match["col"]))
