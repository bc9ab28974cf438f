"""`maskspec draft-vocab`: add or replace the draft vocabulary of an existing adapter."""

from __future__ import annotations

from pathlib import Path

import typer

DRAFT_VOCAB_HELP = """Give an adapter a draft vocabulary: the EOS ids and the most frequent answer tokens of chat \
records, --size ids in all.

Drafts are then chosen among those ids and the tokens of the sequence's context only, which makes each draft \
cheaper; verification still uses the full vocabulary, so the output does not change. `maskspec train` already \
adds one (--draft-vocab); this command adds or replaces it in an existing adapter. --size 0 removes it."""


def register(app: typer.Typer) -> None:
    @app.command("draft-vocab", help=DRAFT_VOCAB_HELP)
    def draft_vocab_cmd(
        adapter: Path = typer.Option(..., "--adapter", help="Adapter folder to update (its weights file is rewritten "
                                     "atomically)."),
        data: str = typer.Option(..., "--data", help="Chat-record JSONL (as for `maskspec train`), data file/folder, "
                                 "or a Hugging Face dataset name."),
        size: int = typer.Option(8192, "--size", help="Ids in the draft vocabulary (0: remove it, drafts use the "
                                 "full vocabulary)."),
        model: str = typer.Option("default", "--model", help="The adapter's base model: HF id, local folder, or "
                                  "'default'."),
        max_length: int = typer.Option(1024, "--max-length", help="Truncate conversations to N tokens."),
    ) -> None:
        from maskspec.train.draft_vocab import add_draft_vocab

        choice = add_draft_vocab(adapter, data, size, model=model, max_length=max_length)
        if choice is None:
            typer.echo(f"{adapter}: draft vocabulary removed (drafts use the full vocabulary)")
        else:
            typer.echo(f"{adapter}: draft vocabulary of {len(choice.ids)} ids written; they cover "
                       f"{100 * choice.coverage:.1f}% of the {choice.target_tokens} answer tokens of {data}")
