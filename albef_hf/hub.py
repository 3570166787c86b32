"""Sharing ALBEF checkpoints through the Hub: one upload of model, processor and model card.

`AlbefPreTrainedModel.push_to_hub` and `AlbefProcessor.push_to_hub` both come here, so that a repository gets the
weights, the code that loads them with `trust_remote_code` (models, processor, pipelines), the processor files and
an ALBEF model card in a single commit. transformers' own `push_to_hub` would write a generic card instead.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from huggingface_hub import HfApi

from .modelcard import AlbefCardInfo, build_model_card, save_model_card, task_for_model_class

__all__ = ["push_to_hub", "save_for_hub", "upload_folder"]


def save_for_hub(
    folder: str | os.PathLike,
    model: Any = None,
    processor: Any = None,
    model_card: AlbefCardInfo | Any = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
    max_shard_size: int | str = "50GB",
) -> None:
    """Write what a Hub repository of this checkpoint holds into `folder`.

    Args:
        model: an ALBEF model (`save_pretrained` writes its weights, config and code).
        processor: its `AlbefProcessor`.
        model_card: an `AlbefCardInfo` or a ready `huggingface_hub.ModelCard`; by default a card is built from the
            model (its task and class) when a model is given.
        repo_id: the Hub repository, for the default card: its title (the last part; default: the folder name)
            and its usage snippets.
        tags: more Hub tags for the default card.
    """
    if model is None and processor is None:
        raise ValueError("nothing to save: give a model, a processor or both")
    os.makedirs(folder, exist_ok=True)
    if model is not None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(folder)
    if model_card is None and model is not None:
        model_card = AlbefCardInfo(
            model_name=(repo_id or os.path.abspath(folder)).rstrip("/").split("/")[-1],
            task=task_for_model_class(type(model).__name__),
            model_class=type(model).__name__,
            extra_tags=list(tags or []),
            repo_id=repo_id,
        )
    if isinstance(model_card, AlbefCardInfo):
        model_card = build_model_card(model_card)
    if model_card is not None:
        save_model_card(model_card, folder)


def push_to_hub(
    repo_id: str,
    model: Any = None,
    processor: Any = None,
    model_card: AlbefCardInfo | Any = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
    api: HfApi | None = None,
):
    """Upload `model`, `processor` and a model card to the Hub repository `repo_id` (created when missing) in one
    commit; returns the `CommitInfo`. See `save_for_hub` for what is written (`tags`: more Hub tags for the
    default card)."""
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(folder, model, processor, model_card, repo_id, tags, max_shard_size)
        return upload_folder(
            folder,
            repo_id,
            commit_message=commit_message or f"Upload {_what(model, processor)} with albef-hf",
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            api=api,
        )


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
):
    """Upload every file of `folder` to `repo_id` (created when missing; `revision` is a branch, created when
    missing) in one commit; returns the `CommitInfo`."""
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message or "Upload with albef-hf",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def _what(model: Any, processor: Any) -> str:
    parts = ([type(model).__name__] if model is not None else []) + (
        ["processor"] if processor is not None else []
    )
    return " and ".join(parts)
