"""The HTTP API of the app, without Serve or Ray: what a request may say and what it gets back.

``errors`` (ApiError, the reason codes, redaction for anonymous callers) and ``limits`` are the
floor; ``validate``, ``metadata`` and ``crop`` check one value each; ``parse`` reads a request's
body into a checked query or row; ``security`` says who may write; ``models`` and ``openapi``
describe the API; ``answers`` encodes answers; ``page`` and ``thumbnails`` serve the search page;
``fastapi_app`` makes the app the ingress deployment (``serve.deployments.ingress``) adds its
routes to. Nothing here imports torch or Ray's deployments: the ingress process stays light.
"""
