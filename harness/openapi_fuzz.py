"""Schema-driven fuzzing of the app with schemathesis, and a typed client generated from its
document: what ``tests/test_openapi_fuzz.py`` runs, and what a developer runs by hand.

JSON Schema can say that an upload is non-empty bytes, not that the bytes decode as an image; the
document says it in words and in the part's ``encoding`` (image types), and schemathesis's way to
generate a valid body of a media type is a strategy registered for it. ``register_image_types``
registers small real images of each type the document names (``serve.http.openapi.IMAGE_TYPES``),
so a "valid" upload in the positive phases is an image, and leaves out the positive cases whose
file is other bytes (``non_image_upload``: its coverage phase takes file samples of other formats);
``harness.schemathesis_hooks`` installs both for the CLI
(``SCHEMATHESIS_HOOKS=harness.schemathesis_hooks``). ``run_schemathesis`` runs the
CLI with every check and every phase, bounded and seeded, and reads its JUnit report.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serve.http.openapi import IMAGE_TYPES

PIL_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
HOOKS_MODULE = "harness.schemathesis_hooks"
ALL_PHASES = "examples,coverage,fuzzing,stateful"


def sample_images(media_type: str, count: int = 3, seed: int = 0) -> list[bytes]:
    """``count`` small, different, deterministic images (a gradient, blocks, noise) encoded as
    ``media_type``."""
    rng = np.random.default_rng(seed)
    h, w = 40, 56
    yy, xx = np.mgrid[0:h, 0:w]
    pictures = [
        np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1),
        np.stack([(xx // 8 + yy // 8) % 2 * 200] * 3, axis=-1),
        rng.integers(0, 256, (h, w, 3)),
    ]
    out = []
    for pixels in (pictures * count)[:count]:
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, format=PIL_FORMATS[media_type]
        )
        out.append(buffer.getvalue())
    return out


def register_image_types() -> list[str]:
    """Make schemathesis generate real images for every image type the document names."""
    import schemathesis
    from hypothesis import strategies as st

    types = [t.strip() for t in IMAGE_TYPES.split(",")]
    for media_type in types:
        schemathesis.openapi.media_type(media_type, st.sampled_from(sample_images(media_type)))
    return types


def decodes(data: bytes) -> bool:
    """Whether ``data`` is an image PIL reads (the app's decoders take what PIL does)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds for bytes that are not an image
        return False


def non_image_upload(body: object) -> bool:
    """Whether a multipart body's ``file`` is non-empty bytes that are no image. The document's
    words say an upload is an image, its schema only "non-empty bytes", and the generator's
    coverage phase takes file samples of other formats (PDF, ZIP, random bytes) for valid
    uploads; the hooks leave such positive cases out (a negative case is sent as generated)."""
    if not isinstance(body, dict) or "file" not in body:
        return False
    data = getattr(body["file"], "data", body["file"])  # schemathesis' Binary wraps bytes
    return isinstance(data, bytes) and bool(data) and not decodes(data)


@dataclass
class FuzzRun:
    returncode: int
    seconds: float
    tests: int
    failures: int
    errors: int
    output: str  # the CLI's stdout and stderr

    def failures_text(self, width: int = 1500) -> str:
        """The report's FAILURES section, each line cut to ``width`` (bodies run long)."""
        start = self.output.find("FAILURES")
        lines = self.output[start if start >= 0 else 0 :].splitlines()
        return "\n".join(line[:width] for line in lines)

    def summary(self) -> str:
        return (
            f"schemathesis exit {self.returncode} in {self.seconds:.0f} s: {self.tests} "
            f"operations/scenarios, {self.failures} failures, {self.errors} errors"
        )


def schemathesis_command(url: str, seed: int, max_examples: int, junit: Path) -> list[str]:
    """The CLI run: every check, every phase, two workers (the coverage phase alone sends ~3,000
    requests, ~95 s of them to ``POST /search``; two keep both cores busy), a fixed seed, no
    example database."""
    cli = Path(sys.executable).with_name("schemathesis")
    return [
        str(cli),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        ALL_PHASES,
        "--seed",
        str(seed),
        "--max-examples",
        str(max_examples),
        "--workers",
        "2",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
        "--no-color",
    ]


def run_schemathesis(
    url: str, workdir: Path, seed: int = 1, max_examples: int = 10, timeout_s: float = 600
) -> FuzzRun:
    """Run the CLI against the app at ``url`` (with the image hooks) and read its report."""
    junit = workdir / "junit.xml"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": HOOKS_MODULE,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    done = subprocess.run(
        schemathesis_command(url, seed, max_examples, junit),
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    seconds = time.perf_counter() - start
    cases = list(ET.parse(junit).getroot().iter("testcase")) if junit.exists() else []
    return FuzzRun(
        done.returncode,
        seconds,
        tests=len(cases),
        failures=sum(len(case.findall("failure")) for case in cases),  # one per failure found
        errors=sum(len(case.findall("error")) for case in cases),
        output=done.stdout + done.stderr,
    )
