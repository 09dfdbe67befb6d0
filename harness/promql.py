"""Prometheus text scrapes, and the subset of PromQL the Grafana board uses, evaluated over them.

No Prometheus or Grafana runs here, so the board (``deploy/grafana/visual-search.json``) is
checked and drawn from scrapes of Ray's metrics export taken by the tests and by
``benchmarks/grafana_board.py``. ``parse`` reads an expression into a small tree
(``metric_names`` lists the series it reads: what ``tests/test_cluster_ops.py`` checks against a
scrape); ``evaluate`` computes it at one scrape of a sequence, the way Prometheus would over the
same samples, approximately: ``rate``/``increase`` take the first and last sample in the window
(counter resets handled, no extrapolation to the window's edges), ``histogram_quantile``
interpolates linearly inside a bucket as Prometheus does.

The subset: numbers; selectors ``name{label="v", label=~"re", label!="v", label!~"re"}`` with an
optional range ``[5m]`` or ``[$__rate_interval]``; ``rate``, ``increase``,
``histogram_quantile``, ``clamp_min``; ``sum``, ``max``, ``min``, ``avg`` and ``count`` with
``by``/``without`` before or after the argument; ``+ - * /`` between a vector and a scalar or two
vectors with the same labels. Dashboard variables (``$application``) match everything, as
Grafana's "All" does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

Labels = frozenset  # of (name, value) pairs, without __name__
Vector = dict  # Labels -> float

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_TOKEN = re.compile(
    r'\s*(?:(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])'
    r"|(?P<id>[A-Za-z_:][\w:]*)|(?P<op>=~|!~|!=|==|[=,(){}+\-*/]))"
)
AGGREGATIONS = {"sum": sum, "max": max, "min": min, "count": len, "avg": lambda v: sum(v) / len(v)}
FUNCTIONS = {"rate", "increase", "histogram_quantile", "clamp_min"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class Scrape:
    """One scrape: its time and every sample, by metric name."""

    t: float
    series: dict[str, Vector] = field(default_factory=dict)


def parse_scrape(text: str, t: float = 0.0, prefix: str = "") -> Scrape:
    """A Prometheus text exposition (only metrics whose name starts with ``prefix``)."""
    scrape = Scrape(t)
    for line in text.splitlines():
        if not line.startswith(prefix) or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        key = Labels(_LABEL.findall(labels or ""))
        scrape.series.setdefault(name, {})[key] = float(value)
    return scrape


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]
    range_s: float | None = None


@dataclass
class Call:
    func: str
    args: list


@dataclass
class Aggregate:
    op: str
    labels: tuple[str, ...]
    without: bool
    arg: object


@dataclass
class Binary:
    op: str
    left: object
    right: object


class _Parser:
    def __init__(self, expr: str, range_s: float) -> None:
        self.tokens = [(m.lastgroup, m.group(m.lastgroup)) for m in _TOKEN.finditer(expr)]
        if "".join(t for _, t in self.tokens) != re.sub(r"\s+", "", expr):
            raise ValueError(f"unsupported PromQL: {expr!r}")
        self.pos, self.range_s = 0, range_s

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        kind, text = self.tokens[self.pos]
        if want is not None and text != want:
            raise ValueError(f"expected {want!r}, got {text!r}")
        self.pos += 1
        return kind, text

    def expr(self):
        node = self.term()
        while self.peek() in ("+", "-"):
            node = Binary(self.take()[1], node, self.term())
        return node

    def term(self):
        node = self.atom()
        while self.peek() in ("*", "/"):
            node = Binary(self.take()[1], node, self.atom())
        return node

    def labels(self) -> tuple[str, ...]:
        self.take("(")
        names = []
        while self.peek() != ")":
            names.append(self.take()[1])
            if self.peek() == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            return float(text)
        if text == "(":
            node = self.expr()
            self.take(")")
            return node
        if text in AGGREGATIONS:
            grouping = None
            if self.peek() in ("by", "without"):
                grouping = (self.take()[1], self.labels())
            self.take("(")
            arg = self.expr()
            self.take(")")
            if grouping is None and self.peek() in ("by", "without"):
                grouping = (self.take()[1], self.labels())
            how, names = grouping or ("by", ())
            return Aggregate(text, names, how == "without", arg)
        if text in FUNCTIONS:
            self.take("(")
            args = [self.expr()]
            while self.peek() == ",":
                self.take()
                args.append(self.expr())
            self.take(")")
            return Call(text, args)
        if kind != "id":
            raise ValueError(f"unexpected {text!r}")
        matchers = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op, value = self.take()[1], self.take()[1], self.take()[1]
                matchers.append((label, op, value[1:-1].replace('\\"', '"')))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        range_s = None
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "range":
            range_s = self.duration(self.take()[1][1:-1])
        return Selector(text, matchers, range_s)

    def duration(self, text: str) -> float:
        if text.startswith("$"):
            return self.range_s
        return float(text[:-1]) * _UNITS[text[-1]]


def parse(expr: str, range_s: float = 60.0):
    """The tree of ``expr``; ranges given as a dashboard variable take ``range_s`` seconds."""
    parser = _Parser(expr, range_s)
    node = parser.expr()
    if parser.peek() is not None:
        raise ValueError(f"trailing {parser.peek()!r} in {expr!r}")
    return node


def metric_names(node) -> set[str]:
    """Every metric name a parsed expression reads."""
    if isinstance(node, Selector):
        return {node.name}
    if isinstance(node, Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, Aggregate):
        return metric_names(node.arg)
    if isinstance(node, Binary):
        return metric_names(node.left) | metric_names(node.right)
    return set()


def _matches(labels: Labels, matchers: list[tuple[str, str, str]]) -> bool:
    have = dict(labels)
    for label, op, value in matchers:
        got = have.get(label, "")
        if value.startswith("$"):  # a dashboard variable set to All
            continue
        hit = re.fullmatch(value, got) is not None if "~" in op else got == value
        if hit == op.startswith("!"):
            return False
    return True


def _select(scrape: Scrape, node: Selector) -> Vector:
    series = scrape.series.get(node.name, {})
    return {k: v for k, v in series.items() if _matches(k, node.matchers)}


def _increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, a), (_, b) in zip(points, points[1:], strict=False):
        total += b - a if b >= a else b  # a counter reset starts again from 0
    return total


def _windowed(node, scrapes: list[Scrape], i: int, per_second: bool) -> Vector:
    sel = node.args[0]
    start = scrapes[i].t - sel.range_s
    window = [s for s in scrapes[: i + 1] if s.t >= start]
    points: dict[Labels, list[tuple[float, float]]] = {}
    for scrape in window:
        for key, value in _select(scrape, sel).items():
            points.setdefault(key, []).append((scrape.t, value))
    out = {}
    for key, pts in points.items():
        if len(pts) >= 2:  # as Prometheus: one sample has no rate
            span = pts[-1][0] - pts[0][0]
            out[key] = _increase(pts) / span if per_second else _increase(pts)
    return out


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le


def _histogram_quantile(q: float, vector: Vector) -> Vector:
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for key, value in vector.items():
        labels = dict(key)
        le = float(labels.pop("le", "nan"))
        groups.setdefault(Labels(labels.items()), []).append((le, value))
    return {k: _quantile(q, b) for k, b in groups.items()}


def _aggregate(node: Aggregate, vector: Vector) -> Vector:
    groups: dict[Labels, list[float]] = {}
    for key, value in vector.items():
        keep = (lambda n: n not in node.labels) if node.without else (lambda n: n in node.labels)
        groups.setdefault(Labels((n, v) for n, v in key if keep(n)), []).append(value)
    return {k: AGGREGATIONS[node.op](v) for k, v in groups.items()}


_OPS = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__}


def _binary(op: str, a: float, b: float) -> float:
    if op == "/":
        return a / b if b else math.nan
    return _OPS[op](float(a), float(b))


def evaluate(node, scrapes: list[Scrape], i: int):
    """The value of a parsed expression at ``scrapes[i]``: a Vector, or a float for a scalar."""
    if isinstance(node, float):
        return node
    if isinstance(node, Selector):
        return _select(scrapes[i], node)
    if isinstance(node, Aggregate):
        return _aggregate(node, evaluate(node.arg, scrapes, i))
    if isinstance(node, Binary):
        left, right = evaluate(node.left, scrapes, i), evaluate(node.right, scrapes, i)
        if isinstance(left, float) and isinstance(right, float):
            return _binary(node.op, left, right)
        if isinstance(right, float):
            return {k: _binary(node.op, v, right) for k, v in left.items()}
        if isinstance(left, float):
            return {k: _binary(node.op, left, v) for k, v in right.items()}
        return {k: _binary(node.op, v, right[k]) for k, v in left.items() if k in right}
    if node.func in ("rate", "increase"):
        return _windowed(node, scrapes, i, per_second=node.func == "rate")
    if node.func == "histogram_quantile":
        return _histogram_quantile(node.args[0], evaluate(node.args[1], scrapes, i))
    vector = evaluate(node.args[0], scrapes, i)  # clamp_min
    return {k: max(v, node.args[1]) for k, v in vector.items()}
