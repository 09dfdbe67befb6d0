"""schemathesis hooks for this app: ``SCHEMATHESIS_HOOKS=harness.schemathesis_hooks st run ...``.

Importing it registers real images for the upload types the document names
(``harness.openapi_fuzz.register_image_types``), so the positive phases send images.
"""

from harness.openapi_fuzz import register_image_types

register_image_types()
