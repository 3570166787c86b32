"""Sharing ALBEF checkpoints through the Hub: one upload of model, processor and model card.

This layer extends the model and processor classes from outside (`extend`, called when albef_hf is imported):
their `push_to_hub` come here, so that a repository gets the weights, the code that loads them with
`trust_remote_code` (models, processor, pipelines), the processor files and an ALBEF model card in a single
commit. transformers' own `push_to_hub` would write a generic card instead. The models do not import this module
nor the card writer; a folder loaded as remote code, without albef_hf, has transformers' `push_to_hub`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from huggingface_hub import HfApi

from .modelcard import AlbefCardInfo, build_model_card, save_model_card, task_for_model_class
from .modeling_albef import AlbefPreTrainedModel, upload_folder
from .processing_albef import AlbefProcessor

__all__ = ["extend", "push_to_hub", "save_for_hub", "upload_folder"]


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


def _what(model: Any, processor: Any) -> str:
    parts = ([type(model).__name__] if model is not None else []) + (
        ["processor"] if processor is not None else []
    )
    return " and ".join(parts)


def push_model_to_hub(
    self: AlbefPreTrainedModel,
    repo_id: str,
    *,
    processor: AlbefProcessor | None = None,
    model_card: AlbefCardInfo | Any = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
):
    """Upload this model, its `processor` and an ALBEF model card to the Hub repository `repo_id`, in one
    commit (transformers' version would write a generic card).

    Args:
        processor: the `AlbefProcessor` to upload with the model.
        model_card: an `albef_hf.modelcard.AlbefCardInfo` (or a `huggingface_hub.ModelCard`); by default a
            card is built from this model's task and class.
        tags: more Hub tags for the default card.
        others: as in transformers' `push_to_hub`.
    """
    return push_to_hub(
        repo_id,
        model=self,
        processor=processor,
        model_card=model_card,
        commit_message=commit_message,
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
        tags=tags,
    )


def push_processor_to_hub(
    self: AlbefProcessor,
    repo_id: str,
    *,
    model: AlbefPreTrainedModel | None = None,
    model_card: AlbefCardInfo | Any = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload this processor (with `model` and an ALBEF model card when a model is given) to the Hub repository
    `repo_id` in one commit; see `push_model_to_hub`."""
    return push_to_hub(
        repo_id,
        model=model,
        processor=self,
        model_card=model_card,
        commit_message=commit_message,
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def extend() -> None:
    """Give `AlbefPreTrainedModel` and `AlbefProcessor` their `push_to_hub` with an ALBEF model card."""
    AlbefPreTrainedModel.push_to_hub = push_model_to_hub
    AlbefProcessor.push_to_hub = push_processor_to_hub
