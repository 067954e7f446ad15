"""Training engine: backend selection, the generic worker loop, the four stages, the Ray Train launcher."""
