"""How many bytes a FAISS index holds in RAM, by part: what ``ShardIndex.memory_bytes`` reports
(the same parts the memory budget of ``index.ann.policy`` counts)."""

from __future__ import annotations

import faiss
import numpy as np

from index.ann.ivf_lists import graph_quantizer
from index.ann.tune import find_ivf


def index_memory(index: faiss.Index) -> dict:
    """Bytes of a FAISS index in RAM by part: ``codes`` and ``ids`` in the inverted lists
    (fast-scan lists count whole blocks of 32, as allocated), ``centroids``, ``other``
    (PQ tables, OPQ/PCA matrices, flat vectors) and ``total``."""
    out = {"codes": 0, "ids": 0, "centroids": 0, "other": 0}
    while isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            t = index.chain.at(i)
            out["other"] += t.d_in * t.d_out * 4
        index = faiss.downcast_index(index.index)
    ivf = find_ivf(index)
    if ivf is None:
        out["other"] += index.ntotal * index.d * 4 if hasattr(index, "get_xb") else 0
    else:
        out["centroids"] += ivf.quantizer.ntotal * ivf.d * 4
        graph = graph_quantizer(ivf)
        if graph is not None:  # its links (index.ann.policy)
            out["centroids"] += graph.hnsw.neighbors.size() * 4
        pq = getattr(ivf, "pq", None)
        out["other"] += pq.centroids.size() * 4 if pq is not None else 0  # PQ codebooks
        invlists = ivf.invlists
        block = faiss.downcast_InvertedLists(invlists)
        block = block if isinstance(block, faiss.BlockInvertedLists) else None
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        out["ids"] += int(sizes.sum()) * 8
        if block is not None:
            blocks = (sizes + block.n_per_block - 1) // block.n_per_block
            out["codes"] += int(blocks.sum()) * block.block_size
        else:
            out["codes"] += int(sizes.sum()) * invlists.code_size
    out["total"] = sum(out.values())
    return out
