"""The HTTP API and web page: FastAPI app, dynamic batching, request guards, the HTTP protocol layer."""
