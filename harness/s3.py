"""A real S3 API on 127.0.0.1 for the object-store tests: moto's server, no mocks of our code.

``S3Server`` runs moto's threaded server on a free loopback port, its conditional PUTs made
atomic as S3's are (``conditional_puts_atomic``). Stores reach it the way s3fs
users point at MinIO or any S3-compatible endpoint: fsspec ``storage_options`` (``Store(...,
storage_options)``, the serve config's ``storage_options``, the jobs' ``--storage-option``) or,
for another process, ``$VISUAL_SEARCH_STORAGE_OPTIONS``. Each test takes a bucket of its own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid

from harness.polling import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


_CONDITIONAL_PUTS = threading.Lock()


def conditional_puts_atomic() -> None:
    """Make moto's conditional PUT one step, as S3's is. moto checks ``If-None-Match: *`` (or
    ``If-Match``) and then writes: two steps, and its threaded server lets a second create of
    the same key fall between them, so both creates succeed and one is lost (six threads
    committing manifests lost one commit in about one run of six). S3 answers the second 412.
    Conditional PUTs are serialised here; other requests are untouched."""
    from moto.s3.responses import S3Response

    plain = S3Response.put_object
    if getattr(plain, "conditional_puts_atomic", False):
        return

    def put_object(self):
        if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
            with _CONDITIONAL_PUTS:
                return plain(self)
        return plain(self)

    put_object.conditional_puts_atomic = True
    S3Response.put_object = put_object


class S3Server:
    def __init__(self) -> None:
        os.environ.update(CREDENTIALS)  # boto reads them; moto accepts any
        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        from moto.server import ThreadedMotoServer

        conditional_puts_atomic()

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        """fsspec options for s3fs: endpoint and credentials, explicitly (Ray workers and Serve
        replicas started before this server do not see its environment)."""
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def env(self) -> dict[str, str]:
        """Environment for another process: the same store options, the way users set them."""
        return {
            **os.environ,
            **CREDENTIALS,
            "VISUAL_SEARCH_STORAGE_OPTIONS": json.dumps(self.storage_options),
        }

    def new_bucket(self, prefix: str = "vs") -> str:
        """A fresh bucket; returns ``s3://<bucket>``."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options).mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self._server.stop()
