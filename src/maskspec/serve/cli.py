"""`maskspec serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import os
from typing import Optional

import typer

from maskspec.decode.cli import check_mode, check_tree
from maskspec.decode.static import check_static
from maskspec.decode.steps import resolve_k, resolve_tree
from maskspec.errors import MaskspecError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def check_log_level(level: str) -> str:
    if level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_LEVELS)}")
    return level.lower()


def check_api_key(key: str | None) -> str | None:
    """A blank key would let in every request that sends a blank Bearer token: refused. (An empty
    MASKSPEC_API_KEY counts as unset.)"""
    if key is not None and not key.strip():
        raise typer.BadParameter("is blank; give a key, or leave --api-key out to serve without one")
    return key


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: str = typer.Option("default", "--model", "-m", help="HF id, local folder, or 'default'."),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="Adapter folder, or 'default'."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MASKSPEC_API_KEY", callback=check_api_key,
                                              help="Require 'Authorization: Bearer KEY' on /v1 endpoints."),
        max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests decoded together."),
        max_queue: int = typer.Option(64, "--max-queue", min=0,
                                      help="Requests allowed to wait for a slot; beyond it: 429."),
        max_new_tokens_limit: int = typer.Option(1024, "--max-new-tokens-limit", min=1,
                                                 help="Largest max_tokens a request may ask for."),
        mode: str = typer.Option("quadratic", "--mode", callback=check_mode, help="quadratic | linear | ar"),
        tree: Optional[int] = typer.Option(None, "--tree", min=0, help="Draft trees of up to N nodes (mode "
                                           "quadratic; 0: a chain; default: the adapter's recommendation for this "
                                           "device when --k is not given either)."),
        k: Optional[int] = typer.Option(None, "--k", help="Drafts per step (default: the k the adapter's config "
                                                          "recommends for this device, else its k)."),
        static: bool = typer.Option(False, "--static", help="Decode with the static step (fixed shapes, "
                                    "--max-batch slots, one host sync per step, CUDA graphs on a GPU; modes ar and "
                                    "quadratic) for greedy requests; sampled ones take the usual step."),
        dtype: str = typer.Option("fp32", "--dtype"),
        device: str = typer.Option("cpu", "--device"),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        log_level: str = typer.Option("info", "--log-level", callback=check_log_level,
                                      help=f"Server log level: {', '.join(LOG_LEVELS)}."),
    ) -> None:
        """Serve the model over an OpenAI-compatible API (chat and text completions, streaming)."""
        try:
            import uvicorn

            from maskspec.serve.app import bind_socket, build_server
        except ImportError as exc:
            raise MaskspecError(f"the server needs FastAPI and uvicorn ({exc.name} is missing): "
                                "pip install 'maskspec[serve]'") from None
        import torch

        from maskspec.decode.cli import load_for_cli

        if threads:
            torch.set_num_threads(threads)
        check_tree(tree, mode)
        if static:
            check_static(mode)
        sock = bind_socket(host, port)
        mtp, mode = load_for_cli(model, adapter, mode, dtype, device, k=k)
        drafts = resolve_k(mtp, mode, k)
        port = sock.getsockname()[1]
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            typer.secho(f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
                        err=True, fg=typer.colors.YELLOW)
        app, scheduler = build_server(mtp, mode=mode, k=k, max_batch=max_batch, max_queue=max_queue,
                                      tree=resolve_tree(mtp, mode, k, tree if mode == "quadratic" else None),
                                      static=static,
                                      max_new_tokens_limit=max_new_tokens_limit, api_key=api_key,
                                      model_name=os.path.basename(str(model).rstrip("/")) if model != "default"
                                      else mtp.model_name)
        trees = scheduler.decoder.tree
        typer.secho(f"maskspec serve: {mtp.model_name}, mode {mode}"
                    f"{'' if mode == 'ar' else f', k {drafts}'}{f', tree {trees}' if trees else ''}, "
                    f"max batch {max_batch}{', static step for greedy requests' if static else ''}, "
                    f"http://{host}:{port}/v1", err=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.stop()
            sock.close()
