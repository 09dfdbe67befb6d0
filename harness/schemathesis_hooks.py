"""schemathesis hooks for this app: ``SCHEMATHESIS_HOOKS=harness.schemathesis_hooks st run ...``.

Importing it registers real images for the upload types the document names
(``harness.openapi_fuzz.register_image_types``), so the positive phases send images, and leaves
out the positive cases whose upload is bytes of another format (``filter_case``; the coverage
phase takes file samples such as a PDF for a valid file: ``harness.openapi_fuzz.non_image_upload``).
Negative cases are sent as generated.
"""

import schemathesis

from harness.openapi_fuzz import non_image_upload, register_image_types

register_image_types()


@schemathesis.hook
def filter_case(context, case):  # noqa: ARG001  (the hook's signature)
    meta = case.meta
    positive = meta is None or meta.generation.mode.is_positive
    return not (positive and non_image_upload(case.body))
