"""schemathesis hooks for this app: ``SCHEMATHESIS_HOOKS=harness.schemathesis_hooks st run ...``.

Importing it registers real images for the upload types the document names
(``harness.openapi_fuzz.register_image_types``), so the positive phases send images, and makes
every upload of non-empty bytes that are no image an image before it is sent (``before_call``:
schemathesis then judges the request as sent, ``harness.openapi_fuzz.upload_as_image``).
"""

import schemathesis

from harness.openapi_fuzz import register_image_types, upload_as_image

register_image_types()


@schemathesis.hook
def before_call(context, case, kwargs):  # noqa: ARG001  (the hook's signature)
    meta = case.meta
    if meta is None or meta.generation.mode.is_positive:  # a negative case stays as generated
        upload_as_image(case.body)
