"""The HTTP surface: FastAPI routes, middleware, the error envelope, auth, admission, playground."""
