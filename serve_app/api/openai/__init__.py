"""The OpenAI-compatible API under /v1: OpenAI's Images API and model list over the same request
flow as /generate (protocol.py: the request and response models; serving.py: the mapping onto
GenerateRequest; router.py: the routes)."""
