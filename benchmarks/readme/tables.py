"""Reading the results and writing markdown: every figure in the README comes from a JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
QUICK = ("peers", "query_scaling", "filtered_search")  # the results with a *_quick variant
suffix = ""  # "_quick" renders the --quick results (for checking the report itself)


def use_quick(quick: bool) -> None:
    global suffix
    suffix = "_quick" if quick else ""


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}{suffix if name in QUICK else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def md_table(rows: list[list], header: str) -> str:
    """A markdown table; ``header`` is its header row's cells, ``" | "``-separated."""
    cells = header.split(" | ")
    out = ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(v, nd=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}"


def met(ok) -> str:
    return "met" if ok else "not met"


def machine_line() -> str:
    for name in ("peers", "query_scaling", "index_build", "embed_throughput"):
        body = load(name)
        if body:
            m = body["machine"]
            return (
                f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, GPU "
                f"{m['gpu']}; Python {m['python']}, faiss {m.get('faiss')}, ray {m.get('ray')}, "
                f"torch {m.get('torch')}. Each JSON records its own machine, versions and load."
            )
    return ""
