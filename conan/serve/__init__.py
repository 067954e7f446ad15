"""OpenAI-compatible embeddings serving: FastAPI app, dynamic batcher, uvicorn and Ray Serve runners."""
