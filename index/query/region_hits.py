"""Region rows found by a search -> the images they belong to (``index.rows.regions``).

A store with regions holds several rows per image (the image and its grid cells); a search of
the rows finds cells, and the answer is about images. Each shard searches for more rows than
``k`` (``fetch_rows``: an image's cells can fill its list otherwise), then every hit is renamed
to its image with the cell's box (``to_images``), and the merge keeps each image once with its
best cell's score (``index.query.merge.merge_topk`` keeps an id's best hit), so an image ranks
by the region that matches the query best, and the answer says which region that was.
"""

from __future__ import annotations

from dataclasses import replace

from index.query.hits import Hit
from index.rows.regions import box_of, parent_of

MAX_ROWS_PER_IMAGE = 8  # rows asked for per image of k: a query rarely matches more cells of one


def fetch_rows(k: int, per_image: int) -> int:
    """Rows to search for so that ``k`` distinct images remain after the collapse, as a rule:
    ``k`` x the cells per image, at most ``MAX_ROWS_PER_IMAGE`` x ``k`` (a query's hits spread
    over many images; the bound keeps rerank work at a few times a plain store's)."""
    if per_image <= 1:
        return k
    return k * min(per_image, MAX_ROWS_PER_IMAGE)


def to_images(hits: list[Hit]) -> list[Hit]:
    """Each hit under its image's id, with the box of the region that matched (None for the
    image's own row); the order and scores are kept (the merge picks each image's best)."""
    out = []
    for h in hits:
        parent = parent_of(h.id)
        out.append(h if parent == h.id else replace(h, id=parent, region=box_of(h.id)))
    return out
