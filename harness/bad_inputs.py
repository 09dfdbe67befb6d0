"""The bad-input table: every kind of odd request, its expected status and error code.

One table for the test suite (``tests/test_bad_input.py``) and the load benchmark
(``benchmarks/load.py``, which fires it under load), so "kinds tried" is one number everywhere.
Each case is built from a ``Context`` (the catalogue's dimension, a real photo, a known-good
vector, the app's limits); bodies are made on demand so the table itself is cheap. Odd but
valid images (GIF, animated GIF, CMYK, 16-bit, greyscale, alpha, ...) must get a 200.

The 50 MB upload is streamed with its Content-Length declared, over a raw socket that stops
sending as soon as the server answers: the app must refuse it from the header, without reading
(let alone buffering) 50 MB. An HTTP client that insists on sending the whole body first would
only see the connection closed under it.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from harness import embed_samples as samples

BIG_UPLOAD = 50 * 1024 * 1024


@dataclass(frozen=True)
class Context:
    dim: int
    jpeg: bytes  # a real catalogue photo
    good_vector: list[float]  # a catalogue vector
    max_upload_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class Case:
    kind: str
    status: int
    error: str | None  # the JSON error code; None for a 2xx
    build: Callable[[Context], dict[str, Any]]  # -> httpx request kwargs (+ "method", "url")


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer at all (connection error)
    error: str | None
    ok: bool  # status and error code as expected
    seconds: float
    note: str = ""


def _upload(data: bytes, name: str = "q.jpg", mime: str = "image/jpeg") -> dict[str, Any]:
    return {"files": {"file": (name, data, mime)}}


def _raw_json(text: str | bytes) -> dict[str, Any]:
    return {"content": text, "headers": {"content-type": "application/json"}}


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [samples.photo(seed).convert("P") for seed in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


def _odd(name: str) -> Callable[[Context], dict[str, Any]]:
    return lambda _ctx: _upload(samples.odd_valid_files()[name], name)


def _vector_text(ctx: Context, first: str) -> str:
    return '{"vector": [' + first + ", 0.1" * (ctx.dim - 1) + "]}"


def _multipart_dup_file(ctx: Context) -> dict[str, Any]:
    return {"files": [("file", ("a.jpg", ctx.jpeg, "image/jpeg")), ("file", ("b.jpg", ctx.jpeg))]}


def _broken_multipart(_ctx: Context) -> dict[str, Any]:
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
    body += b"\r\n\xff\xd8 never closed"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=xyz"}}


CASES: list[Case] = [
    # ---- bodies that are not a query at all ----
    Case("empty_body", 400, "missing_query", lambda c: _raw_json(b"")),
    Case("empty_file", 422, "empty", lambda c: _upload(b"")),
    Case("not_an_image", 415, "not_an_image", lambda c: _upload(b"%PDF-1.4 a document\n" * 50)),
    Case("truncated_jpeg", 422, "truncated", lambda c: _upload(c.jpeg[: len(c.jpeg) // 2])),
    Case("jpeg_header_only", 422, "truncated", lambda c: _upload(c.jpeg[:600])),
    Case("png_bomb", 413, "decompression_bomb", lambda c: _upload(samples.bomb_png(), "b.png")),
    Case(
        "png_header_bomb",
        413,
        "decompression_bomb",
        lambda c: _upload(samples.huge_header_png(), "h.png"),
    ),
    Case("upload_50mb", 413, "too_large", lambda c: {"stream_bytes": BIG_UPLOAD}),
    Case(
        "upload_chunked_over_limit",
        413,
        "too_large",
        lambda c: {
            "content": _chunks(c.max_upload_bytes + 256 * 1024),
            "headers": {"content-type": "multipart/form-data; boundary=xyz"},
        },
    ),
    Case(
        "wrong_content_type",
        415,
        "unsupported_media_type",
        lambda c: {"content": c.jpeg, "headers": {"content-type": "image/jpeg"}},
    ),
    Case(
        "text_plain_body",
        415,
        "unsupported_media_type",
        lambda c: {"content": b"hello", "headers": {"content-type": "text/plain"}},
    ),
    Case("multipart_no_file", 400, "missing_query", lambda c: {"files": {"k": (None, "3")}}),
    # an unterminated part: the parser keeps what it could read (nothing), so no file
    Case("multipart_unterminated", 400, "missing_query", _broken_multipart),
    Case(
        "multipart_no_boundary",
        400,
        "invalid_multipart",
        lambda c: {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}},
    ),
    Case("multipart_two_files", 400, "invalid_multipart", _multipart_dup_file),
    # ---- odd but valid images: must work ----
    Case("gif", 200, None, _odd("palette.gif")),
    Case("animated_gif", 200, None, lambda c: _upload(_animated_gif(), "anim.gif", "image/gif")),
    Case("cmyk_jpeg", 200, None, _odd("cmyk.jpg")),
    Case("png_16bit_grey", 200, None, _odd("grey16.png")),
    Case("greyscale_jpeg", 200, None, _odd("grey.jpg")),
    Case("png_alpha", 200, None, _odd("alpha.png")),
    Case("exif_rotated_jpeg", 200, None, _odd("rotated.jpg")),
    Case("png_1x1", 200, None, _odd("tiny.png")),
    Case(
        "webp",
        200,
        None,
        lambda c: _upload(_save(samples.photo(5), "WEBP"), "a.webp", "image/webp"),
    ),
    Case("bmp", 200, None, lambda c: _upload(_save(samples.photo(6), "BMP"), "a.bmp")),
    Case("tiff", 200, None, lambda c: _upload(_save(samples.photo(7), "TIFF"), "a.tiff")),
    Case(
        "jpeg_as_octet_stream",
        200,
        None,
        lambda c: _upload(c.jpeg, "photo.bin", "application/octet-stream"),
    ),
    # ---- vectors ----
    Case("vector_wrong_length", 422, "wrong_vector_length", lambda c: {"json": {"vector": [0.1]}}),
    Case("vector_nan", 422, "non_finite_vector", lambda c: _raw_json(_vector_text(c, "NaN"))),
    Case("vector_inf", 422, "non_finite_vector", lambda c: _raw_json(_vector_text(c, "-Infinity"))),
    Case(
        "vector_float32_overflow",
        422,
        "non_finite_vector",
        lambda c: _raw_json(_vector_text(c, "1e39")),
    ),
    Case("vector_zero", 422, "zero_vector", lambda c: {"json": {"vector": [0.0] * c.dim}}),
    Case("vector_strings", 422, "invalid_vector", lambda c: {"json": {"vector": ["a"] * c.dim}}),
    Case("vector_nested", 422, "invalid_vector", lambda c: {"json": {"vector": [[0.1]] * c.dim}}),
    Case("vector_booleans", 422, "invalid_vector", lambda c: {"json": {"vector": [True] * c.dim}}),
    Case("vector_not_a_list", 422, "invalid_vector", lambda c: {"json": {"vector": "0.1,0.2"}}),
    # ---- parameters ----
    Case("k_zero", 422, "k_out_of_range", lambda c: {"json": {"vector": c.good_vector, "k": 0}}),
    Case(
        "k_million",
        422,
        "k_out_of_range",
        lambda c: {"json": {"vector": c.good_vector}, "params": {"k": 10**6}},
    ),
    Case(
        "k_negative", 422, "k_out_of_range", lambda c: {"json": {"vector": c.good_vector, "k": -5}}
    ),
    Case(
        "k_not_a_number",
        422,
        "invalid_parameter",
        lambda c: {"json": {"vector": c.good_vector}, "params": {"k": "ten"}},
    ),
    Case(
        "k_fractional",
        422,
        "invalid_parameter",
        lambda c: {"json": {"vector": c.good_vector, "k": 2.5}},
    ),
    Case(
        "k_huge_integer",
        422,
        "k_out_of_range",
        lambda c: {"json": {"vector": c.good_vector}, "params": {"k": "9" * 400}},
    ),
    Case(
        "nprobe_zero",
        422,
        "nprobe_out_of_range",
        lambda c: {"json": {"vector": c.good_vector, "nprobe": 0}},
    ),
    Case(
        "candidates_huge",
        422,
        "candidates_out_of_range",
        lambda c: {"json": {"vector": c.good_vector, "candidates": 10**9}},
    ),
    Case(
        "rerank_not_bool",
        422,
        "invalid_parameter",
        lambda c: {"json": {"vector": c.good_vector}, "params": {"rerank": "maybe"}},
    ),
    Case(
        "unknown_field",
        422,
        "invalid_parameter",
        lambda c: {"json": {"vector": c.good_vector, "top": 3}},
    ),
    # ---- ids ----
    Case("unknown_id", 404, "unknown_id", lambda c: {"json": {"id": "0123456789abcdef"}}),
    Case("unicode_id", 404, "unknown_id", lambda c: {"json": {"id": "猫の写真-🐈-ü\u200b"}}),
    # an id never holds "/" (the /images/{id} routes could not name it): refused as such
    Case("path_like_id", 422, "invalid_id", lambda c: {"json": {"id": "../../etc/passwd"}}),
    Case(
        "path_like_id_in_query",
        422,
        "invalid_id",
        lambda c: {"url": "/search?id=" + quote("..%2F/../\\windows\\system32", safe="")},
    ),
    Case("id_nul_bytes", 404, "unknown_id", lambda c: {"json": {"id": "a\u0000b"}}),
    Case("id_too_long", 422, "invalid_id", lambda c: {"json": {"id": "x" * 5000}}),
    Case("id_not_a_string", 422, "invalid_id", lambda c: {"json": {"id": {"$ne": None}}}),
    Case(
        "vector_and_id",
        400,
        "ambiguous_query",
        lambda c: {"json": {"vector": c.good_vector, "id": "abc"}},
    ),
    # ---- JSON itself ----
    Case("malformed_json", 400, "invalid_json", lambda c: _raw_json('{"vector": [0.1, 0.2')),
    Case("json_not_an_object", 400, "invalid_json", lambda c: _raw_json("[1, 2, 3]")),
    Case("json_invalid_utf8", 400, "invalid_json", lambda c: _raw_json(b'{"id": "\xff\xfe"}')),
    Case(
        "json_deeply_nested",
        400,
        "invalid_json",
        lambda c: _raw_json("[" * 100_000 + "]" * 100_000),
    ),
    Case(
        "json_huge_array",
        422,
        "wrong_vector_length",
        lambda c: _raw_json('{"vector": [' + ",".join(["0.5"] * 500_000) + "]}"),
    ),
    Case(
        "json_over_size_limit",
        413,
        "too_large",
        lambda c: _raw_json('{"vector": [' + ",".join(["0.123456789"] * 600_000) + "]}"),
    ),
    Case("json_empty_object", 400, "missing_query", lambda c: {"json": {}}),
    # ---- wrong route or method: still a JSON error ----
    Case("get_search", 405, "method_not_allowed", lambda c: {"method": "GET", "url": "/search"}),
    Case("unknown_path", 404, "not_found", lambda c: {"method": "GET", "url": "/../etc/passwd"}),
]

KINDS = [case.kind for case in CASES]
assert len(set(KINDS)) == len(KINDS), "bad-input kinds must be unique"


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"\0" * n
        sent += n


def context_from(dim: int, jpeg: bytes, vector: np.ndarray, config: Any) -> Context:
    return Context(
        dim=dim,
        jpeg=jpeg,
        good_vector=[float(v) for v in vector],
        max_upload_bytes=config.max_upload_bytes,
        max_pixels=config.max_pixels,
    )


def stream_upload(base_url: str, total: int, timeout_s: float = 30.0) -> tuple[int, dict, int]:
    """POST a multipart body that declares ``total`` bytes, sending it in 64 KiB pieces and
    stopping the moment the server answers; ``(status, json body, bytes sent)``."""
    url = httpx.URL(base_url)
    head = (
        f"POST /search HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {total}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sent = 0
    received = b""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((url.host, url.port), timeout=timeout_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        chunk = b"\0" * 65536
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                if _complete(received):
                    break
                continue
            except BlockingIOError:
                pass
            if sent < total:
                try:
                    sent += sock.send(chunk[: total - sent])
                except BlockingIOError:
                    time.sleep(0.001)  # the server is not reading: wait for its answer
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                time.sleep(0.001)
    head_text, _, body = received.partition(b"\r\n\r\n")
    if not head_text:
        raise ConnectionError(f"no HTTP answer after sending {sent} of {total} bytes")
    status = int(head_text.split(b" ", 2)[1])
    try:
        return status, json.loads(_dechunk(head_text, body)), sent
    except ValueError:
        return status, {}, sent


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return body.endswith(b"0\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _dechunk(head: bytes, body: bytes) -> bytes:
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def send(client: httpx.Client, case: Case, ctx: Context) -> Outcome:
    """Send one case, compare with its expectation; never raises for an HTTP-level failure."""
    spec = case.build(ctx)
    start = time.perf_counter()
    note = ""
    try:
        if "stream_bytes" in spec:
            status, body, sent = stream_upload(str(client.base_url), spec["stream_bytes"])
            note = f"server answered after {sent} of {spec['stream_bytes']} bytes"
        else:
            spec = dict(spec)
            method = spec.pop("method", "POST")
            url = spec.pop("url", "/search")
            r = client.request(method, url, **spec)
            status = r.status_code
            try:
                body = r.json()
            except ValueError:
                body = {"raw": r.text[:200]}
    except (httpx.HTTPError, OSError) as e:
        return Outcome(case.kind, None, None, False, time.perf_counter() - start, repr(e))
    seconds = time.perf_counter() - start
    error = body.get("error") if isinstance(body, dict) else None
    ok = status == case.status and error == case.error
    if ok and case.status == 200:
        ok = bool(body.get("results")) and body.get("partial") is False
    if ok and case.error is not None:
        ok = bool(body.get("detail"))
    if not ok:
        note = (note + " " + json.dumps(body)[:300]).strip()
    return Outcome(case.kind, status, error, ok, seconds, note)
