"""``visual-search search`` and ``visual-search stats``: the HTTP client from a shell.

    visual-search search cat.jpg --k 5                # an image file or fsspec URI
    visual-search search --id 3f2a9c0d1e2b4a5c        # a catalogue row's neighbours
    visual-search search --vector q.npy --json        # a vector (.npy, or a JSON list; - = stdin)
    visual-search search --text "red shoes"           # a text (models with a text tower: CLIP)
    visual-search search shoe.jpg --text "in red" --text-weight 0.3   # image + text, mixed
    visual-search search cat.jpg --expand --dedup --diversify 0.7    # answer shaping
    visual-search search crop.jpg --verify --k 20     # instance search: the same object first
    visual-search search shelf.jpg --box 0.2,0.1,0.6,0.5   # by a part of the photo (--regions)
    visual-search stats [--json]

A table by default (rank, score, shard, id, uri, then any metadata fields of the results; with
``--dedup`` the number of near-duplicates each result stands for), the
app's JSON with ``--json``. Exit status: 0 answered (a partial answer too, with a warning on
stderr, unless ``--fail-partial``: then 1), 1 the app failed (5xx), 2 bad usage or query file,
3 the app cannot be reached, 4 the app refused the query (4xx, e.g. ``unknown_id``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visual_search import exits
from visual_search.client import DEFAULT_URL, URL_ENV, SearchClient, SearchError

CORE = ("id", "uri", "score", "shard")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"the app's base URL (default ${URL_ENV} or {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the app's JSON answer")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")


def _load_vector(spec: str) -> list[float]:
    if spec.endswith(".npy"):
        import numpy as np

        return np.load(spec).astype(float).ravel().tolist()
    text = sys.stdin.read() if spec == "-" else Path(spec).read_text()
    value = json.loads(text)
    if isinstance(value, dict):
        value = value.get("vector")
    if not isinstance(value, list):
        raise ValueError(f"{spec}: expected a JSON list of numbers (or {{'vector': [...]}})")
    return value


def _box(spec: str) -> tuple[float, ...]:
    """``--box X0,Y0,X1,Y1``: four fractions of the image's width and height."""
    from embedding.preprocess import check_box

    try:
        return check_box(spec.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (from {spec!r}: X0,Y0,X1,Y1)") from None


def _fail(error: SearchError) -> int:
    print(f"visual-search: {error}", file=sys.stderr)
    if error.status is None:
        return exits.UNREACHABLE
    return exits.REFUSED if error.status < 500 else exits.FAILED


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def format_results(body: dict) -> str:
    """The results as a text table; metadata fields after the core columns."""
    results = body.get("results", [])
    extra = sorted({key for r in results for key in r if key not in CORE})

    def cell(r: dict, key: str) -> str:
        if key not in r:
            return ""
        if key == "collapsed":  # dedup: how many near-duplicates this result stands for
            return f"+{len(r[key])}"
        return json.dumps(r[key])

    rows = [
        [str(i), f"{r['score']:.4f}", str(r["shard"]), str(r["id"]), str(r["uri"])]
        + [cell(r, key) for key in extra]
        for i, r in enumerate(results, 1)
    ]
    lines = _table(["rank", "score", "shard", "id", "uri", *extra], rows)
    lines.append(
        f"{len(results)} results in {body.get('took_ms', 0):.1f} ms, "
        f"{body.get('shards_answered')}/{body.get('shards_total')} shards"
        + (
            f" ({body['shards_visited']} visited: a routed store)"
            if body.get("shards_visited", body.get("shards_total")) != body.get("shards_total")
            else ""
        )
    )
    return "\n".join(lines)


def search_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Query a running app with an image, a catalogue id, a vector or a text.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", nargs="?", help="query image: a file or an fsspec URI")
    parser.add_argument("--id", help="search by a catalogue row's id")
    parser.add_argument("--vector", help="query vector: a .npy file, a JSON file, or - (stdin)")
    parser.add_argument("--text", help="a text query (models with a text tower, e.g. CLIP)")
    parser.add_argument(
        "--text-weight",
        type=float,
        help="with --text and an image, id or vector: the text's share, 0..1 (default 0.5)",
    )
    parser.add_argument("--k", type=int, help="results (1..1000; default the app's, 10)")
    parser.add_argument("--nprobe", type=int, help="IVF lists probed per shard")
    parser.add_argument("--candidates", type=int, help="per-shard candidates for rerank")
    parser.add_argument(
        "--shards-probe", type=int, help="a routed store's shards to visit (the app's default)"
    )
    parser.add_argument("--no-rerank", dest="rerank", action="store_false", default=None)
    shaping = parser.add_argument_group("answer shaping (all off unless given)")
    shaping.add_argument(
        "--expand", action="store_true", default=None, help="average query expansion"
    )
    shaping.add_argument("--expand-m", type=int, help="results averaged into the query")
    shaping.add_argument("--expand-alpha", type=float, help="weight score**alpha per result")
    shaping.add_argument(
        "--diversify",
        nargs="?",
        const=True,
        type=float,
        metavar="LAMBDA",
        help="MMR diversification (lambda in 0..1; 1 = plain ranking; bare: the app's default)",
    )
    shaping.add_argument(
        "--dedup",
        nargs="?",
        const=True,
        type=float,
        metavar="THRESHOLD",
        help="collapse near-duplicates above a similarity (bare: the app's default)",
    )
    shaping.add_argument(
        "--exclude-self", action="store_true", default=None, help="leave the query itself out"
    )
    shaping.add_argument("--min-score", type=float, help="leave out results scoring below this")
    shaping.add_argument(
        "--verify",
        action="store_true",
        default=None,
        help="image queries: the same object first (local features + RANSAC; column inliers)",
    )
    parser.add_argument(
        "--box",
        type=_box,
        metavar="X0,Y0,X1,Y1",
        help="image queries: search by this part of the image (fractions of its width and "
        "height, e.g. 0.2,0.2,0.7,0.8); a store embedded with --regions finds the photos "
        "holding it",
    )
    parser.add_argument(
        "--fail-partial", action="store_true", help="exit 1 when some shard did not answer"
    )
    _common(parser)
    args = parser.parse_args(argv)
    given = [name for name in ("image", "id", "vector") if getattr(args, name) is not None]
    if len(given) > 1 or not (given or args.text is not None):
        parser.error("give one of IMAGE, --id, --vector, and/or --text")
    if args.box is not None and args.image is None:
        parser.error("--box: only with an IMAGE")
    try:
        vector = _load_vector(args.vector) if args.vector is not None else None
        with SearchClient(args.url, timeout=args.timeout) as client:
            body = client.search(
                args.image,
                id=args.id,
                vector=vector,
                k=args.k,
                nprobe=args.nprobe,
                rerank=args.rerank,
                candidates=args.candidates,
                shards_probe=args.shards_probe,
                expand=args.expand,
                expand_m=args.expand_m,
                expand_alpha=args.expand_alpha,
                diversify=args.diversify,
                dedup=args.dedup,
                exclude_self=args.exclude_self,
                min_score=args.min_score,
                text=args.text,
                text_weight=args.text_weight,
                verify=args.verify,
                box=args.box,
            )
    except SearchError as e:
        return _fail(e)
    except (OSError, ValueError) as e:  # an unreadable query file
        print(f"visual-search search: error: {e}", file=sys.stderr)
        return exits.USAGE
    print(json.dumps(body, indent=2) if args.json else format_results(body))
    if body.get("partial"):
        missing = ", ".join(f"{m['shard']} ({m['reason']})" for m in body["missing_shards"])
        print(f"warning: partial answer, shards missing: {missing}", file=sys.stderr)
        return exits.FAILED if args.fail_partial else exits.OK
    return exits.OK


def format_stats(stats: dict) -> str:
    rows = [
        [
            str(s["shard"]),
            str(s.get("version") or "-"),
            f"{s.get('count', 0):,}",
            f"{s.get('delta', 0):,}",
            f"{s.get('memory_bytes', 0) / 2**20:.1f}",
            s.get("error") or s.get("reload_error") or s.get("factory") or "",
        ]
        for s in stats["shards"]
    ]
    summary = (
        f"model {stats['model']}, {stats['dim']}-d {stats['metric']}, "
        f"{stats['total_count']:,} rows in {stats['num_shards']} shards, "
        f"{stats['memory_bytes'] / 2**20:.1f} MiB"
    )
    header = ["shard", "version", "rows", "delta", "MiB", "index / error"]
    return "\n".join([summary, *_table(header, rows)])


def stats_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The running app's catalogue: model, rows, shards, versions, memory."
    )
    _common(parser)
    args = parser.parse_args(argv)
    try:
        with SearchClient(args.url, timeout=args.timeout) as client:
            stats = client.stats()
    except SearchError as e:
        return _fail(e)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return exits.OK
