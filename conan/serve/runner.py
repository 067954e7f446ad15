"""Running the embeddings app: uvicorn in this process, or a Ray Serve deployment with replicas."""

from __future__ import annotations

from conan.config import ServeConfig
from conan.serve.app import create_app


def run_uvicorn(cfg: ServeConfig) -> None:
    """Serve on cfg.host:cfg.port until SIGTERM / Ctrl-C, then finish the requests in flight (drain_timeout_s)."""
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
                timeout_graceful_shutdown=cfg.drain_timeout_s)


def serve_application(cfg: ServeConfig):
    """A Ray Serve application: cfg.replicas replicas, each with the FastAPI app and its own encoder."""
    from ray import serve

    app = create_app(cfg)

    @serve.deployment(name="conan-embeddings", num_replicas=cfg.replicas,
                      graceful_shutdown_timeout_s=cfg.drain_timeout_s,
                      ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": 1 if cfg.device == "cuda" else 0})
    @serve.ingress(app)
    class EmbeddingServer:
        """Ray Serve replica of the embeddings app (the encoder loads in the app's lifespan)."""

    return EmbeddingServer.bind()


def run_ray_serve(cfg: ServeConfig, blocking: bool = True) -> None:
    """Deploy on Ray Serve (local Ray or cfg.ray_address) with HTTP on cfg.host:cfg.port."""
    from ray import serve

    from conan.runtime import init_ray

    init_ray(cfg.ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(serve_application(cfg), name="conan-embeddings", route_prefix="/", blocking=blocking)
