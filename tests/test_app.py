"""The interactive page (`python -m albef_hf.app`) in a real browser: headless Chromium (the system's, driven by
Playwright) against the app served on 127.0.0.1 on a free port, and the same functions through `gradio_client`.

The model is a tiny ALBEF trained in the fixture until it tells apart the four pictures of a small gallery, so
that a caption must bring back its own picture first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from conftest import tiny_config, tiny_processor
from transformers import pipeline

from albef_hf import AlbefForPreTraining, AlbefForQuestionAnswering, AlbefModel
from albef_hf.app import AlbefAppService, Gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (.ci/run installs the Debian package with apt-get)"
)
# Headless, and nothing that reaches out of this machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000

# The gallery: four pictures and their captions (words of the test vocabulary).
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle above a blue square"]


def draw_gallery() -> list[PIL.Image.Image]:
    def canvas() -> tuple[PIL.Image.Image, PIL.ImageDraw.ImageDraw]:
        image = PIL.Image.new("RGB", (32, 32), "white")
        return image, PIL.ImageDraw.Draw(image)

    images = []
    for shape, colour in (("circle", "red"), ("square", "blue"), ("triangle", "green")):
        image, draw = canvas()
        if shape == "circle":
            draw.ellipse((6, 6, 26, 26), fill=colour)
        elif shape == "square":
            draw.rectangle((6, 6, 26, 26), fill=colour)
        else:
            draw.polygon([(16, 5), (27, 27), (5, 27)], fill=colour)
        images.append(image)
    image, draw = canvas()
    draw.ellipse((10, 1, 22, 13), fill="yellow")
    draw.rectangle((10, 18, 22, 30), fill="blue")
    images.append(image)
    return images


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gallery")
    for index, image in enumerate(draw_gallery()):
        image.save(folder / f"scene{index}.png")
    (folder / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    (folder / "notes.txt").write_text("not an image: the gallery skips it")
    return str(folder)


@pytest.fixture(scope="module")
def fitted_folder(tmp_path_factory) -> str:
    """A tiny AlbefForPreTraining trained (ITC and ITM, 80 steps) on the four gallery pairs, saved."""
    folder = tmp_path_factory.mktemp("fitted")
    processor = tiny_processor()
    torch.manual_seed(0)
    config = tiny_config(initializer_range=0.05, mlm_weight=0.0)
    model = AlbefForPreTraining._from_config(config, attn_implementation="eager")
    batch = processor(images=draw_gallery(), text=CAPTIONS, pairs=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is the fastest on a busy machine
    try:
        model.train()
        for _ in range(80):
            model(**batch, generator=generator).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(fitted_folder, gallery_dir):
    """The app of the fitted model and the folder gallery, served on 127.0.0.1."""
    from albef_hf.app.ui import launch

    service = AlbefAppService.from_pretrained(fitted_folder)
    service.gallery = Gallery.from_folder(gallery_dir, os.path.join(gallery_dir, "captions.txt"))
    blocks = launch(service, port=free_port(), block=False, top_k=4)
    yield service, blocks.local_url
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (.ci/run installs the Debian package with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    origin = url.rstrip("/")
    # only the app itself: anything else (web fonts, analytics) is refused
    page.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith((origin, "data:", "blob:")) else route.abort()
        ),
    )
    page.goto(url)
    return page


def upload(page, elem_id: str, path: str) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(path)
    page.wait_for_selector(f"#{elem_id} img")


def wait_for_first_row(page, elem_id: str, cell: str) -> list[str]:
    """Wait until the first row of a results table has `cell` in its second column; returns the row."""
    page.wait_for_function(
        "([id, cell]) => document.querySelectorAll(`#${id} [role=row]`)[1]?.innerText.split('\\n')[1] === cell",
        arg=[elem_id, cell],
    )
    return page.locator(f"#{elem_id} [role=row]").nth(1).inner_text().split("\n")


def message(page, elem_id: str) -> str:
    """The text of a message (a Markdown output) once it has one."""
    text = f"#{elem_id} [data-testid=markdown]"
    page.wait_for_function("sel => (document.querySelector(sel)?.innerText || '').trim() !== ''", arg=text)
    return page.locator(text).inner_text().strip()


# ----------------------------------------------------------------------------------------------
# In the browser
# ----------------------------------------------------------------------------------------------


@needs_chromium
def test_match_shows_the_scores_and_the_heatmap(browser, served, fitted_folder, gallery_dir, tmp_path):
    service, url = served
    page = open_page(browser, url)
    image = os.path.join(gallery_dir, "scene0.png")
    matcher = pipeline("image-text-matching", model=fitted_folder)
    upload(page, "match-image", image)
    for text in ("a red circle", "a green triangle"):
        page.locator("#match-text textarea").fill(text)
        page.locator("#match-button").click()
        page.wait_for_selector("#match-heatmap img")
        expected = matcher(image, text)
        page.wait_for_function(
            "v => Math.abs(parseFloat(document.querySelector('#match-itm input').value) - v) <= 5e-5",
            arg=expected["itm_probability"],
        )
        shown_itc = float(page.locator("#match-itc input").input_value())
        assert shown_itc == pytest.approx(expected["itc_similarity"], abs=5e-5)
        # the <img> appears before its data is decoded: wait for the decoded image, then check its size
        page.wait_for_function(
            "() => { const img = document.querySelector('#match-heatmap img'); return img && img.complete "
            "&& img.naturalWidth > 0; }"
        )
        heatmap = page.locator("#match-heatmap img")
        assert heatmap.evaluate("img => img.naturalWidth") == 32
        page.screenshot(path=str(tmp_path / f"match-{text.replace(' ', '-')}.png"), full_page=True)
    # the fitted model tells its own caption from another's
    assert (
        matcher(image, "a red circle")["itm_probability"]
        > 0.9
        > 0.1
        > matcher(image, "a green triangle")["itm_probability"]
    )
    page.close()


@needs_chromium
def test_search_finds_the_scene_of_a_caption_and_the_caption_of_a_scene(
    browser, served, gallery_dir, tmp_path
):
    _, url = served
    page = open_page(browser, url)
    page.get_by_role("tab", name="Search").click()
    page.wait_for_function("document.getElementById('search-status').innerText.includes('indexed in')")
    assert "4 images and 4 captions indexed" in page.locator("#search-status").inner_text()
    for index, caption in enumerate(CAPTIONS):
        page.locator("#search-text textarea").fill(caption)
        page.locator("#search-text-button").click()
        assert wait_for_first_row(page, "search-image-table", f"scene{index}.png")[0] == "1"
        assert page.locator("#search-gallery img").count() == 4
    page.screenshot(path=str(tmp_path / "search-text.png"), full_page=True)

    upload(page, "search-image", os.path.join(gallery_dir, "scene3.png"))
    page.locator("#search-image-button").click()
    assert wait_for_first_row(page, "search-caption-table", CAPTIONS[3])[0] == "1"
    page.screenshot(path=str(tmp_path / "search-image.png"), full_page=True)
    page.close()


@needs_chromium
def test_bad_input_shows_a_message_not_a_stack_trace(browser, served, gallery_dir, tmp_path):
    _, url = served
    page = open_page(browser, url)
    page.locator("#match-text textarea").fill("a red circle")
    page.locator("#match-button").click()
    assert message(page, "match-message") == "upload an image first"

    unreadable = tmp_path / "photo.png"
    unreadable.write_bytes(b"these bytes are no picture")
    page.locator("#match-image input[type=file]").set_input_files(str(unreadable))
    page.locator("#match-button").click()
    page.wait_for_function(
        "document.querySelector('#match-message [data-testid=markdown]').innerText.includes('photo.png')"
    )
    assert "could not read 'photo.png' as an image" in message(page, "match-message")
    page.screenshot(path=str(tmp_path / "unreadable.png"), full_page=True)

    page.reload()
    upload(page, "match-image", os.path.join(gallery_dir, "scene0.png"))
    page.locator("#match-text textarea").fill("   ")
    page.locator("#match-button").click()
    assert message(page, "match-message") == "type a text first"

    page.get_by_role("tab", name="Zero-shot").click()
    upload(page, "zero-shot-image", os.path.join(gallery_dir, "scene0.png"))
    page.locator("#zero-shot-labels textarea").fill(" , ,")
    page.locator("#zero-shot-button").click()
    assert message(page, "zero-shot-message") == "give labels, separated by commas"
    assert "Traceback" not in page.content()
    page.close()


@needs_chromium
def test_zero_shot_shows_the_probabilities(browser, served, gallery_dir, tmp_path):
    service, url = served
    page = open_page(browser, url)
    page.get_by_role("tab", name="Zero-shot").click()
    image = os.path.join(gallery_dir, "scene1.png")
    upload(page, "zero-shot-image", image)
    page.locator("#zero-shot-labels textarea").fill("red circle, blue square, green triangle")
    page.locator("#zero-shot-template textarea").fill("a {}")
    page.locator("#zero-shot-button").click()
    expected = service.zero_shot(PIL.Image.open(image), "red circle, blue square, green triangle", "a {}")
    best = max(expected, key=expected.get)
    page.wait_for_function("document.querySelector('#zero-shot-probabilities').innerText.includes('%')")
    shown = page.locator("#zero-shot-probabilities").inner_text()
    # the label's title, the best label, then each label with its percentage
    assert shown.split("\n")[:2] == ["Probabilities", best] and best == "blue square"
    for label, probability in expected.items():
        assert f"{label}\n{round(100 * probability)}%" in shown
    page.screenshot(path=str(tmp_path / "zero-shot.png"), full_page=True)
    page.close()


@needs_chromium
def test_a_vqa_checkpoint_answers_and_the_other_tabs_say_why_not(browser, tmp_path):
    from albef_hf.app.ui import launch

    torch.manual_seed(0)
    AlbefForQuestionAnswering(tiny_config()).save_pretrained(tmp_path / "vqa")
    tiny_processor().save_pretrained(tmp_path / "vqa")
    answers = ["red", "blue", "green", "two", "three"]
    (tmp_path / "vqa" / "answer_list.json").write_text(json.dumps(answers))
    service = AlbefAppService.from_pretrained(tmp_path / "vqa")
    blocks = launch(service, port=free_port(), block=False)
    try:
        page = open_page(browser, blocks.local_url)
        assert "no ITM head" in page.locator("#match-unavailable").inner_text()
        page.get_by_role("tab", name="Zero-shot").click()
        assert "no ITC projections" in page.locator("#zero-shot-unavailable").inner_text()
        page.get_by_role("tab", name="VQA").click()
        image = tmp_path / "scene.png"
        draw_gallery()[0].save(image)
        upload(page, "vqa-image", str(image))
        page.locator("#vqa-question textarea").fill("what colour is the circle?")
        page.locator("#vqa-button").click()
        page.wait_for_function("document.querySelector('#vqa-answers').innerText.includes('%')")
        expected = pipeline("visual-question-answering", model=str(tmp_path / "vqa"))(
            str(image), "what colour is the circle?", candidate_answers=answers, top_k=5
        )
        shown = page.locator("#vqa-answers").inner_text()
        assert shown.split("\n")[:2] == ["Answers", expected[0]["answer"]]
        for answer in expected:
            assert f"{answer['answer']}\n{round(100 * answer['score'])}%" in shown
        page.screenshot(path=str(tmp_path / "vqa.png"), full_page=True)
        page.close()
    finally:
        blocks.close()


# ----------------------------------------------------------------------------------------------
# Programmatic: gradio_client, and the service without a page
# ----------------------------------------------------------------------------------------------


def test_gradio_client_calls_the_same_functions(served, gallery_dir):
    from gradio_client import Client, handle_file

    service, url = served
    client = Client(url, verbose=False)
    image = os.path.join(gallery_dir, "scene2.png")
    itm, itc, heatmap, note = client.predict(
        handle_file(image), "a green triangle", "ITM, fusion layer (the paper's)", api_name="/match"
    )
    expected = service.match(PIL.Image.open(image), "a green triangle", "itm")
    assert note == ""
    assert itm == pytest.approx(expected["itm_probability"], abs=1e-4)
    assert itc == pytest.approx(expected["itc_similarity"], abs=1e-4)
    assert PIL.Image.open(heatmap).size == (32, 32)

    assert "4 images and 4 captions indexed in" in client.predict(api_name="/index_gallery")
    _, table, note = client.predict("a blue square", api_name="/search_images")
    assert note == "" and table["data"][0][:2] == [1, "scene1.png"]
    probabilities, note = client.predict(handle_file(image), "", "a picture of a {}", api_name="/zero_shot")
    assert not probabilities and note == "**give labels, separated by commas**"


def test_tabs_follow_what_the_checkpoint_serves(tmp_path):
    AlbefModel(tiny_config()).save_pretrained(tmp_path / "base")
    tiny_processor().save_pretrained(tmp_path / "base")
    service = AlbefAppService.from_pretrained(tmp_path / "base")
    available = service.available()
    assert available["zero-shot"] is None
    assert "no ITM head" in available["match"] and "no ITM head" in available["search"]
    assert "AlbefForQuestionAnswering" in available["vqa"]
    with pytest.raises(ValueError, match="not an ALBEF checkpoint"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        AlbefAppService.from_pretrained(tmp_path / "other")


def test_a_folder_gallery_needs_a_readable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"no picture")
    with pytest.raises(ValueError, match="holds no readable image"):
        Gallery.from_folder(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        Gallery.from_folder(tmp_path / "missing")


def test_the_command_line_says_what_is_wrong(tmp_path):
    from albef_hf.app.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "missing")])
    assert str(exit_info.value).startswith("error: ")
    AlbefForPreTraining(tiny_config()).save_pretrained(tmp_path / "model")
    tiny_processor().save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="error: the gallery .* is not a folder"):
        main(["--model", str(tmp_path / "model"), "--gallery", str(tmp_path / "nowhere")])


def test_a_class_of_the_checkpoints_own_code_loads_with_trust_remote_code(tmp_path):
    folder = tmp_path / "custom"
    AlbefForPreTraining(tiny_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    # a class albef_hf does not have, in the folder's code
    with open(folder / "modeling_albef.py", "a") as handle:
        handle.write('\n\nclass AlbefWithNotes(AlbefForPreTraining):\n    """An ALBEF of its own."""\n')
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["AlbefWithNotes"]
    config["auto_map"]["AutoModelForPreTraining"] = "modeling_albef.AlbefWithNotes"
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="saved from AlbefWithNotes.*pass --trust-remote-code"):
        AlbefAppService.from_pretrained(folder)
    service = AlbefAppService.from_pretrained(folder, trust_remote_code=True)
    assert type(service.model).__name__ == "AlbefWithNotes"
    assert type(service.model).__module__.startswith("transformers_modules")
    # served as the ALBEF class it derives from
    assert service.available()["match"] is None
    image = draw_gallery()[0]
    matched = service.match(image, "a red circle")
    # the same weights in albef_hf's own class
    albef = AlbefForPreTraining.from_pretrained(folder)
    expected = pipeline("image-text-matching", model=albef, processor=tiny_processor())(image, "a red circle")
    assert matched["itm_probability"] == pytest.approx(expected["itm_probability"], abs=1e-5)


def test_a_vqa_checkpoint_without_an_answer_list_generates(tmp_path):
    torch.manual_seed(0)
    AlbefForQuestionAnswering(tiny_config()).save_pretrained(tmp_path / "vqa")
    tiny_processor().save_pretrained(tmp_path / "vqa")
    service = AlbefAppService.from_pretrained(tmp_path / "vqa")
    assert service.answer_list is None and service.available()["vqa"] is None
    image = draw_gallery()[0]
    answers = service.vqa(image, "what colour is the circle?", top_k=2)
    expected = pipeline("visual-question-answering", model=str(tmp_path / "vqa"))(
        image, "what colour is the circle?", top_k=2
    )
    assert answers == expected and len(answers) == 2 and "score" not in answers[0]
    with pytest.raises(ValueError, match="type a question first"):
        service.vqa(image, "")
