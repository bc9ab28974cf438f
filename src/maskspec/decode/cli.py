"""`maskspec generate` and `maskspec chat`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from maskspec.decode.api import StreamChunk, generate, stream
from maskspec.decode.static import check_static
from maskspec.decode.steps import MODES, resolve_k, resolve_static, resolve_tree
from maskspec.decode.verify import check_sampling
from maskspec.errors import MaskspecError, UsageError
from maskspec.loading import load_for_decoding
from maskspec.messages import check_text
from maskspec.model.mtp import MTPModel


def load_for_cli(model: str, adapter: Optional[str], mode: str, dtype: str, device: str,
                 quiet: bool = False, k: Optional[int] = None) -> tuple[MTPModel, str]:
    """`loading.load_for_decoding` with its notice printed on stderr (unless `quiet`)."""
    def notice(message: str) -> None:
        if not quiet:
            typer.secho(f"notice: {message}", err=True, fg=typer.colors.YELLOW)

    return load_for_decoding(model, adapter, mode=mode, k=k, dtype=dtype, device=device, notice=notice)


STATIC_HELP = ("The static step: fixed shapes, one host sync per step, a CUDA graph on a GPU (greedy, modes ar and "
               "quadratic, chains and trees). Default: what the adapter's config recommends "
               "for this device, when --k and --tree are not given either.")


def check_tree(tree: int | None, mode: str) -> None:
    if tree and mode != "quadratic":
        raise UsageError(f"--tree needs --mode quadratic (a mask block after every node), got --mode {mode}")


def read_line(prompt: str) -> str:
    """One line of interactive input. Bytes that are not UTF-8 are a one-line error: on a terminal the line is
    skipped (the conversation goes on), from a pipe or file the command stops. (Python reads them either as an
    error or, with surrogateescape, as lone surrogates: both count.)"""
    while True:
        try:
            return check_text(input(prompt), "standard input")
        except (UnicodeDecodeError, MaskspecError):
            if not sys.stdin.isatty():
                raise UsageError("standard input is not UTF-8 text") from None
            typer.secho("error: that line is not UTF-8 text; type it again", err=True, fg=typer.colors.RED)


def check_mode(mode: str) -> str:
    """Typer callback for --mode, shared by the commands that decode."""
    if mode not in MODES:
        raise typer.BadParameter(f"choose one of {', '.join(MODES)}")
    return mode


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        prompt: str = typer.Argument(..., help="The user message (the chat template is applied)."),
        model: str = typer.Option("default", "--model", "-m", help="HF id, local folder, or 'default'."),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="Adapter folder, or 'default'."),
        mode: str = typer.Option("quadratic", "--mode", callback=check_mode, help="quadratic | linear | ar"),
        k: Optional[int] = typer.Option(None, "--k", help="Drafts per step (default: the k the adapter's config "
                                                          "recommends for this device, else its k)."),
        tree: Optional[int] = typer.Option(None, "--tree", min=0, help="Draft trees of up to N nodes (mode "
                                           "quadratic; 0: a chain; default: what the adapter's config recommends "
                                           "for this device when --k is not given either)."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0),
        temperature: float = typer.Option(0.0, "--temperature", "-t"),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        dtype: str = typer.Option("fp32", "--dtype"),
        device: str = typer.Option("cpu", "--device"),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (last line of stdout)."),
        static: Optional[bool] = typer.Option(None, "--static/--no-static", help=STATIC_HELP),
    ) -> None:
        """Generate an answer to PROMPT, several tokens per forward pass."""
        check_sampling(temperature, top_p, top_k, seed)
        check_tree(tree, mode)
        if static:
            check_static(mode, greedy=temperature == 0)
        mtp, mode = load_for_cli(model, adapter, mode, dtype, device, k=k)
        asked_tree = tree if mode == "quadratic" else None  # fallback to ar: no drafts
        tree = resolve_tree(mtp, mode, k, asked_tree)
        static = resolve_static(mtp, mode, k, asked_tree, static, temperature == 0)

        def show(chunk: StreamChunk) -> None:
            if not as_json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()

        out = generate(mtp, prompt, streamer=show, max_new_tokens=max_new_tokens, mode=mode, k=k,
                       temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed, tree=tree,
                       static=static)
        s = out.stats
        if as_json:
            print(json.dumps({"text": out.text, "new_tokens": s.new_tokens, "forward_passes": s.forward_passes,
                              "tokens_per_pass": round(s.tokens_per_pass, 4), "seconds": round(s.seconds, 4),
                              "tokens_per_second": round(s.tokens_per_second, 2), "mode": mode,
                              "k": resolve_k(mtp, mode, k) or None, "tree": tree, "static": static,
                              "finish_reason": s.finish_reason,
                              "accepted_histogram": s.accepted_histogram}))
        else:
            sys.stdout.write("\n")
            typer.secho(f"[{s.new_tokens} tokens, {s.forward_passes} passes, {s.tokens_per_pass:.2f} tokens/pass, "
                        f"{s.tokens_per_second:.1f} tokens/s, mode {mode}]", err=True, fg=typer.colors.BRIGHT_BLACK)

    @app.command("chat")
    def chat_cmd(
        model: str = typer.Option("default", "--model", "-m"),
        adapter: Optional[str] = typer.Option(None, "--adapter", "-a"),
        mode: str = typer.Option("quadratic", "--mode", callback=check_mode),
        k: Optional[int] = typer.Option(None, "--k"),
        tree: Optional[int] = typer.Option(None, "--tree", min=0, help="Draft trees of up to N nodes (0: a chain; "
                                           "default: the adapter's recommendation for this device)."),
        static: Optional[bool] = typer.Option(None, "--static/--no-static", help=STATIC_HELP),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
        temperature: float = typer.Option(0.0, "--temperature", "-t"),
        system: Optional[str] = typer.Option(None, "--system", help="System message."),
        dtype: str = typer.Option("fp32", "--dtype"),
        device: str = typer.Option("cpu", "--device"),
    ) -> None:
        """Interactive multi-turn chat. /reset clears the history, /exit quits, Ctrl-C stops an answer."""
        check_sampling(temperature)
        check_tree(tree, mode)
        if static:
            check_static(mode, greedy=temperature == 0)
        mtp, mode = load_for_cli(model, adapter, mode, dtype, device, k=k)
        asked_tree = tree if mode == "quadratic" else None
        tree = resolve_tree(mtp, mode, k, asked_tree)
        static = resolve_static(mtp, mode, k, asked_tree, static, temperature == 0)
        history: list[dict] = [{"role": "system", "content": system}] if system else []
        typer.secho("maskspec chat: /reset clears the conversation, /exit quits, Ctrl-C stops an answer.",
                    fg=typer.colors.BRIGHT_BLACK)
        while True:
            try:
                line = read_line("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                history = history[:1] if system else []
                typer.secho("(conversation cleared)", fg=typer.colors.BRIGHT_BLACK)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            answer, stats = "", None
            sys.stdout.write("assistant> ")
            try:
                for chunk in stream(mtp, history, max_new_tokens=max_new_tokens, mode=mode, k=k,
                                    temperature=temperature, tree=tree, static=static):
                    answer += chunk.text
                    stats = chunk.stats
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            except MaskspecError as exc:  # e.g. the conversation outgrew the context: drop the turn, keep chatting
                history.pop()
                sys.stdout.write("\n")
                typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
                continue
            history.append({"role": "assistant", "content": answer})
            sys.stdout.write("\n")
            if stats is not None:
                typer.secho(f"[{stats.tokens_per_pass:.2f} tokens/pass, {stats.tokens_per_second:.1f} tokens/s]",
                            fg=typer.colors.BRIGHT_BLACK)
