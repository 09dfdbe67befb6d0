"""Draw query images beside their top-k results from a built store, for the README picture.

    .venv/bin/python scripts/draw_results.py --store demo-store/store --out docs/demo-results.png \
        demo-store/queries/*.png

Searches in-process with the same modules the Serve graph uses (embedding.Embedder,
index.ann.shard_index.ShardIndex per shard, index.query.merge.merge_topk), so what it draws is what
the
HTTP endpoint answers for the same image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from embedding import Embedder, ModelConfig, decode_image  # noqa: E402
from index.ann.shard_index import ShardIndex  # noqa: E402
from index.query.merge import merge_topk  # noqa: E402
from index.storage.manifest import load_manifest  # noqa: E402
from index.storage.store import Store  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="docs/demo-results.png")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("queries", nargs="+")
    args = p.parse_args()
    store = Store(args.store)
    manifest = load_manifest(store)
    embedder = Embedder(ModelConfig(name=manifest.model))
    shards = [ShardIndex.load(store, s) for s in range(manifest.num_shards)]
    rows = len(args.queries)
    fig, axes = plt.subplots(rows, args.k + 1, figsize=(2 * (args.k + 1), 2.1 * rows))
    axes = axes.reshape(rows, args.k + 1)
    for r, query in enumerate(args.queries):
        image = decode_image(Path(query).read_bytes())
        vector = embedder.embed_images([image])
        hits = merge_topk([s.search(vector, args.k)[0] for s in shards], args.k, manifest.metric)
        axes[r, 0].imshow(image)
        axes[r, 0].set_title("query", fontsize=9, color="tab:blue")
        for c, hit in enumerate(hits, start=1):
            axes[r, c].imshow(Image.open(hit.uri.removeprefix("file://")).convert("RGB"))
            axes[r, c].set_title(f"#{c}  {hit.score:.3f}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("held-out query (left) and its top-5 from the demo catalogue, cosine score")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
