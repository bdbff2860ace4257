"""The HTTP layer: the FastAPI app, its routes, schemas, authentication and middleware."""
