"""HTTP serving: FastAPI app, uploads, micro-batching, security headers, the web page."""
