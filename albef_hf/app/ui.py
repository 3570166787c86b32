"""The page: gradio Blocks over an `AlbefAppService`, one tab per task.

Every handler returns its outputs and a message; bad input (no image, an empty text, an unreadable file) fills
the message and clears the outputs, so the page never shows a stack trace. The handlers are also the page's
API, by name, for `gradio_client` (`/match`, `/index_gallery`, `/search_images`, `/search_captions`,
`/zero_shot`, `/vqa`).
"""

from __future__ import annotations

import os

# gradio reads this when it is imported: no usage statistics leave the machine
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import PIL.Image
from transformers.utils import logging

from .service import GRADCAM_MODES, AlbefAppService

__all__ = ["build_app", "image_input", "launch"]

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class UnreadableUpload:
    """An uploaded file that is not a readable image (the page reports it)."""

    name: str


def image_input(**kwargs: Any) -> gr.Image:
    """A `gr.Image` (PIL) whose unreadable uploads reach the handler as an `UnreadableUpload`, so that the page
    says what is wrong instead of failing before the handler runs.

    The instance's `preprocess` is wrapped rather than subclassed: gradio writes a `.pyi` stub next to the module
    of every component subclass."""
    component = gr.Image(type="pil", **kwargs)
    preprocess = component.preprocess

    def tolerant(payload: Any) -> PIL.Image.Image | UnreadableUpload | None:
        try:
            return preprocess(payload)
        except (OSError, ValueError, PIL.UnidentifiedImageError):
            name = getattr(payload, "orig_name", None) or os.path.basename(getattr(payload, "path", "") or "")
            return UnreadableUpload(name or "the upload")

    component.preprocess = tolerant
    return component


def _image(value: Any) -> Any:
    if isinstance(value, UnreadableUpload):
        raise ValueError(
            f"could not read {value.name!r} as an image: upload a PNG, JPEG, GIF, BMP or WebP file"
        )
    return value


def _reported(empty: tuple[Any, ...]) -> Callable:
    """Run a handler; on bad input return `empty` outputs and the message, on anything else a short error (the
    traceback goes to the server's log)."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            try:
                return (*handler(*args, **kwargs), "")
            except ValueError as error:
                return (*empty, f"**{error}**")
            except Exception as error:  # noqa: BLE001  (the page shows a message, never a stack trace)
                logger.exception("request failed")
                return (*empty, f"**the model could not answer: {type(error).__name__}: {error}**")

        return run

    return wrap


def build_app(service: AlbefAppService, top_k: int = 5) -> gr.Blocks:
    """The Blocks of the page for `service`; tabs the checkpoint cannot serve say why."""
    available = service.available()
    with gr.Blocks(title="ALBEF", analytics_enabled=False) as blocks:
        gr.Markdown(
            f"# ALBEF\n`{service.name or service.saved_as}`, a checkpoint saved from `{service.saved_as}`"
        )
        with gr.Tabs():
            with gr.Tab("Match", id="match"):
                _match_tab(service, available["match"])
            with gr.Tab("Search", id="search"):
                _search_tab(blocks, service, available["search"], top_k)
            with gr.Tab("Zero-shot", id="zero-shot"):
                _zero_shot_tab(service, available["zero-shot"])
            with gr.Tab("VQA", id="vqa"):
                _vqa_tab(service, available["vqa"], top_k)
    return blocks


def _unavailable(reason: str | None, tab: str) -> bool:
    if reason is not None:
        gr.Markdown(f"**This checkpoint cannot serve this tab:** {reason}.", elem_id=f"{tab}-unavailable")
    return reason is not None


def _match_tab(service: AlbefAppService, reason: str | None) -> None:
    gr.Markdown(
        "The probability that the image and the text match (ITM head), their ITC cosine similarity, and where "
        "the text is in the image (Grad-CAM)."
    )
    if _unavailable(reason, "match"):
        return
    with gr.Row():
        with gr.Column():
            image = image_input(
                label="Image", height=256, elem_id="match-image", elem_classes="albef-picture"
            )
            text = gr.Textbox(
                label="Text", placeholder="a red circle above a blue square", elem_id="match-text"
            )
            mode = gr.Radio(list(GRADCAM_MODES), value=next(iter(GRADCAM_MODES)), label="Grad-CAM")
            button = gr.Button("Match", variant="primary", elem_id="match-button")
        with gr.Column():
            with gr.Row():
                itm = gr.Number(label="ITM probability", precision=4, elem_id="match-itm")
                itc = gr.Number(label="ITC similarity", precision=4, elem_id="match-itc")
            heatmap = gr.Image(
                label="Grad-CAM heatmap",
                type="pil",
                height=256,
                elem_id="match-heatmap",
                elem_classes="albef-picture",
            )
            message = gr.Markdown(elem_id="match-message")

    @_reported((None, None, None))
    def match(image: Any, text: str, mode: str) -> tuple[Any, ...]:
        result = service.match(_image(image), text, GRADCAM_MODES.get(mode, "itc"))
        return result["itm_probability"], result["itc_similarity"], result["overlay"]

    button.click(match, [image, text, mode], [itm, itc, heatmap, message], api_name="match")


def _search_tab(blocks: gr.Blocks, service: AlbefAppService, reason: str | None, top_k: int) -> None:
    gr.Markdown(
        "Text-to-image and image-to-caption retrieval over a gallery, as ALBEF evaluates it: an ITC shortlist "
        're-ranked by the ITM score (the ITM head\'s "match" logit).'
    )
    if _unavailable(reason, "search"):
        return
    status = gr.Markdown(
        f"Gallery: {service.gallery.source}; the index is built when the page first opens.",
        elem_id="search-status",
    )
    with gr.Row():
        with gr.Column():
            query = gr.Textbox(label="Text query", placeholder="two red circles", elem_id="search-text")
            text_button = gr.Button("Search images", variant="primary", elem_id="search-text-button")
            gallery = gr.Gallery(
                label="Top images",
                columns=top_k,
                rows=1,
                height=200,
                object_fit="contain",
                elem_id="search-gallery",
            )
            image_table = gr.Dataframe(
                headers=["rank", "image", "ITM score", "ITM probability", "ITC similarity"],
                elem_id="search-image-table",
            )
        with gr.Column():
            image = image_input(
                label="Image query", height=256, elem_id="search-image", elem_classes="albef-picture"
            )
            image_button = gr.Button("Search captions", variant="primary", elem_id="search-image-button")
            caption_table = gr.Dataframe(
                headers=["rank", "caption", "ITM score", "ITM probability", "ITC similarity"],
                elem_id="search-caption-table",
            )
    message = gr.Markdown(elem_id="search-message")

    def index_gallery(progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008  (gradio's progress hook)
        try:
            start = time.perf_counter()
            images, captions = service.index(lambda fraction, what: progress(fraction, desc=what))
        except ValueError as error:
            return f"**{error}**"
        what = f"{len(images.ids)} images" + (f" and {len(captions.ids)} captions" if captions else "")
        return f"Gallery: {service.gallery.source}; {what} indexed in {time.perf_counter() - start:.1f} s."

    @_reported((None, None))
    def search_images(text: str) -> tuple[Any, ...]:
        results = service.search_images(text, top_k)
        shown = [
            (r["image"], f"{rank}. {r['name']}: {r['itm_probability']:.3f}")
            for rank, r in enumerate(results, 1)
        ]
        rows = [
            [
                rank,
                r["name"],
                round(r["score"], 4),
                round(r["itm_probability"], 4),
                round(r["itc_similarity"], 4),
            ]
            for rank, r in enumerate(results, 1)
        ]
        return shown, rows

    @_reported((None,))
    def search_captions(image: Any) -> tuple[Any, ...]:
        results = service.search_captions(_image(image), top_k)
        return (
            [
                [
                    rank,
                    r["text"],
                    round(r["score"], 4),
                    round(r["itm_probability"], 4),
                    round(r["itc_similarity"], 4),
                ]
                for rank, r in enumerate(results, 1)
            ],
        )

    # indexed once, when the page first opens (a progress bar shows while it runs); later visits find it built
    blocks.load(index_gallery, None, status, api_name="index_gallery")
    text_button.click(search_images, query, [gallery, image_table, message], api_name="search_images")
    query.submit(search_images, query, [gallery, image_table, message], api_name=False)
    image_button.click(search_captions, image, [caption_table, message], api_name="search_captions")


def _zero_shot_tab(service: AlbefAppService, reason: str | None) -> None:
    gr.Markdown(
        "Zero-shot classification: the image's probabilities over your labels (transformers' "
        "`zero-shot-image-classification` pipeline, ITC similarities)."
    )
    if _unavailable(reason, "zero-shot"):
        return
    with gr.Row():
        with gr.Column():
            image = image_input(
                label="Image", height=256, elem_id="zero-shot-image", elem_classes="albef-picture"
            )
            labels = gr.Textbox(
                label="Labels, comma-separated",
                placeholder="circle, square, triangle",
                elem_id="zero-shot-labels",
            )
            template = gr.Textbox(label="Template", value="a picture of a {}", elem_id="zero-shot-template")
            button = gr.Button("Classify", variant="primary", elem_id="zero-shot-button")
        with gr.Column():
            probabilities = gr.Label(label="Probabilities", elem_id="zero-shot-probabilities")
            message = gr.Markdown(elem_id="zero-shot-message")

    @_reported((None,))
    def zero_shot(image: Any, labels: str, template: str) -> tuple[Any, ...]:
        return (service.zero_shot(_image(image), labels, template),)

    button.click(zero_shot, [image, labels, template], [probabilities, message], api_name="zero_shot")


def _vqa_tab(service: AlbefAppService, reason: str | None, top_k: int) -> None:
    how = (
        f"ranked over the checkpoint's {len(service.answer_list)} answers"
        if service.answer_list
        else "generated (the checkpoint has no answer list, answer_list.json)"
    )
    gr.Markdown(f"Visual question answering: answers {how}.")
    if _unavailable(reason, "vqa"):
        return
    with gr.Row():
        with gr.Column():
            image = image_input(label="Image", height=256, elem_id="vqa-image", elem_classes="albef-picture")
            question = gr.Textbox(
                label="Question", placeholder="how many circles are there?", elem_id="vqa-question"
            )
            button = gr.Button("Answer", variant="primary", elem_id="vqa-button")
        with gr.Column():
            answers = gr.Label(label="Answers", elem_id="vqa-answers")
            message = gr.Markdown(elem_id="vqa-message")

    @_reported((None,))
    def vqa(image: Any, question: str) -> tuple[Any, ...]:
        results = service.vqa(_image(image), question, top_k)
        if "score" in results[0]:
            return ({r["answer"]: r["score"] for r in results},)
        return (results[0]["answer"],)

    button.click(vqa, [image, question], [answers, message], api_name="vqa")


# Small models see small images (64 px for the demo's): shown scaled up, pixels kept sharp.
CSS = """
.albef-picture img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""

# System fonts: the default theme's web fonts would be fetched from the internet.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def launch(
    service: AlbefAppService,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    top_k: int = 5,
) -> gr.Blocks:
    """Serve the page of `service` on `host:port` (a free port from 7860 when None); no share link. With
    `block=False` it returns once the server is up (`.local_url` on the returned Blocks; `.close()` stops it)."""
    blocks = build_app(service, top_k)
    blocks.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        show_error=False,
        ssr_mode=False,
        quiet=not block,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
    )
    return blocks
