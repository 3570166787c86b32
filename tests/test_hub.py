"""Checkpoints through the Hub.

Download side: a folder saved as the Trainer saves it (model, processor, model card) is committed to a git
repository that a Hub-compatible server started here (olah, on 127.0.0.1) serves; fresh processes load it by repo
id and revision with `HF_ENDPOINT` pointed at the server: one with albef_hf, one in a virtual environment without
it (trust_remote_code).

Upload side, WITHOUT A LIVE HUB: `HfApi.create_repo` / `create_branch` / `upload_folder` are replaced by recorders,
and the tests check the exact files and card that `push_to_hub` would send.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import site
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import torch
from conftest import random_images, tiny_config, tiny_processor
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from transformers import pipeline

from albef_hf import AlbefForPreTraining, AlbefForQuestionAnswering, AlbefModel
from albef_hf.modelcard import AlbefCardInfo, build_model_card, save_model_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HERE = pathlib.Path(__file__).resolve().parent
REPO = "org/name"
CARD = AlbefCardInfo(
    model_name="albef-tiny-synthetic",
    task="pretraining",
    model_class="AlbefForPreTraining",
    training={
        "trainer": "albef_hf.AlbefTrainer",
        "optimizer steps": 120,
        "momentum distillation": "alpha 0.4",
    },
    metrics={"txt_r1": 41.5, "img_r1": 38.25},
    dataset_name="synthetic-world",
    dataset_split="test",
    repo_id=REPO,
)
# the code a folder carries: the models' modules, and each served pipeline's module with what it imports (never
# the Hub layer nor the card writer: the models do not import them, they extend the models from outside)
BASE_CODE_FILES = {
    "configuration_albef.py",
    "modeling_albef.py",
    "modeling_albef_text.py",
    "losses.py",
    "pretrained_towers.py",
    "base.py",
    "feature_extraction.py",
    "image_processing_albef.py",
    "processing_albef.py",
}
CODE_FILES = BASE_CODE_FILES | {
    "image_text_matching.py",
    "image_text_retrieval.py",
    "retrieval_index.py",
    "visual_grounding.py",
    "grounding.py",
}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json"}


def trainer_like_save(folder: pathlib.Path, seed: int) -> AlbefForPreTraining:
    """What the Trainer writes at the end of training: the model, the processor and the model card."""
    torch.manual_seed(seed)
    model = AlbefForPreTraining(tiny_config()).eval()
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    save_model_card(build_model_card(CARD), folder)
    return model


# ----------------------------------------------------------------------------------------------
# A local Hub
# ----------------------------------------------------------------------------------------------


def olah_python() -> str:
    if importlib.util.find_spec("olah") is not None:
        return sys.executable
    candidate = os.environ.get("OLAH_PYTHON")
    if candidate and subprocess.run([candidate, "-c", "import olah"], capture_output=True).returncode == 0:
        return candidate
    pytest.skip("olah is not installed: `pip install olah` (or set OLAH_PYTHON to a Python that has it)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(folder: pathlib.Path, *args: str) -> str:
    identity = ["-c", "user.name=albef-hf tests", "-c", "user.email=tests@albef-hf.invalid"]
    result = subprocess.run(["git", *identity, *args], cwd=folder, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Serve `org/name` with two commits: v1 (kept as `v1_folder`) and v2 on main."""
    python = olah_python()
    root = tmp_path_factory.mktemp("hub")
    repository = root / "mirrors" / "models" / "org" / "name"
    repository.mkdir(parents=True)
    git(repository, "init", "--quiet", "--initial-branch=main")
    v1 = trainer_like_save(repository, seed=0)
    git(repository, "add", "--all")
    git(repository, "commit", "--quiet", "-m", "v1")
    v1_sha = git(repository, "rev-parse", "HEAD")
    shutil.copytree(repository, root / "v1", ignore=shutil.ignore_patterns(".git"))
    v2 = trainer_like_save(repository, seed=1)
    git(repository, "commit", "--quiet", "--all", "-m", "v2")
    vqa = root / "mirrors" / "models" / "org" / "vqa"
    vqa.mkdir()
    git(vqa, "init", "--quiet", "--initial-branch=main")
    torch.manual_seed(2)
    AlbefForQuestionAnswering(tiny_config()).save_pretrained(vqa)
    tiny_processor().save_pretrained(vqa)
    git(vqa, "add", "--all")
    git(vqa, "commit", "--quiet", "-m", "vqa")

    port = free_port()
    config = root / "olah.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [basic]
            host = "127.0.0.1"
            port = {port}
            repos-path = "{root / "cache"}"
            mirrors-path = ["{root / "mirrors"}"]
            [accessibility]
            offline = true
            """
        )
    )
    log = open(root / "olah.log", "w")  # noqa: SIM115 - closed when the server stops
    server = subprocess.Popen(
        [python, str(HERE / "hub_server.py"), "--config", str(config), "--log-path", str(root / "logs")],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(server, f"{endpoint}/api/models/{REPO}/revision/main", root / "olah.log")
        yield {
            "endpoint": endpoint,
            "v1": v1,
            "v2": v2,
            "v1_sha": v1_sha,
            "v1_folder": root / "v1",
            "vqa_folder": vqa,
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def wait_until_serving(server: subprocess.Popen, url: str, log: pathlib.Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"the Hub server stopped (exit {server.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Hub server did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def run_fresh(python: str, script: str, hub: dict, tmp_path: pathlib.Path, *args: str, package: bool) -> dict:
    """Run `script` in a new process against the local Hub, with an empty cache; returns its json output."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
    }
    env.update(
        HF_ENDPOINT=hub["endpoint"],
        HF_HOME=str(tmp_path / "hf-home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
    )
    if package:
        env["PYTHONPATH"] = str(HERE.parent)
    image = tmp_path / "image.png"
    random_images(1, seed=11)[0].save(image)
    result = subprocess.run(
        [python, "-c", script, str(tmp_path), hub["v1_sha"], str(image), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


# ----------------------------------------------------------------------------------------------
# Download side
# ----------------------------------------------------------------------------------------------

WITH_PACKAGE = textwrap.dedent(
    """
    import json, sys
    import PIL.Image
    from safetensors.torch import save_file
    from transformers import pipeline
    from albef_hf import AlbefModel

    out, v1, image = sys.argv[1], sys.argv[2], PIL.Image.open(sys.argv[3])
    save_file(AlbefModel.from_pretrained("org/name", revision=v1).state_dict(), f"{out}/v1.safetensors")
    save_file(AlbefModel.from_pretrained("org/name", revision="main").state_dict(), f"{out}/main.safetensors")
    matcher = pipeline("image-text-matching", model="org/name", revision=v1)
    grounder = pipeline("visual-grounding", model="org/name", revision=v1)
    result = {
        "matching": matcher(image, "a red circle"),
        "grounding_score": grounder(image, "a red circle")["score"],
        "classes": [type(matcher).__module__, type(matcher.model).__module__],
    }
    # the interactive page's requests, on the Hub id
    from albef_hf.app import AlbefAppService

    app = AlbefAppService.from_pretrained("org/name", revision=v1)
    result["app_match"] = app.match(image, "a red circle")["itm_probability"]
    result["app_zero_shot"] = app.zero_shot(image, "red circle, blue square", "a {}")
    json.dump(result, open(f"{out}/result.json", "w"))
    """
)


def test_a_trainer_folder_loads_from_the_hub_by_revision_in_a_fresh_process(hub, tmp_path):
    result = run_fresh(sys.executable, WITH_PACKAGE, hub, tmp_path, package=True)
    assert result["classes"] == ["albef_hf.pipelines.image_text_matching", "albef_hf.modeling_albef"]
    for name, saved in (("v1", hub["v1"]), ("main", hub["v2"])):
        loaded = load_file(tmp_path / f"{name}.safetensors")
        expected = saved.state_dict()
        assert loaded.keys() == AlbefModel(tiny_config()).state_dict().keys()
        assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.items()), name

    local = pipeline("image-text-matching", model=str(hub["v1_folder"]))
    image = random_images(1, seed=11)[0]
    assert result["matching"] == pytest.approx(local(image, "a red circle"))
    assert result["app_match"] == pytest.approx(local(image, "a red circle")["itm_probability"])
    classify = pipeline("zero-shot-image-classification", model=str(hub["v1_folder"]))
    expected = classify(image, candidate_labels=["red circle", "blue square"], hypothesis_template="a {}")
    assert result["app_zero_shot"] == pytest.approx({r["label"]: r["score"] for r in expected})


WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("albef_hf") is None, "this environment must not have albef_hf"
    import PIL.Image
    from safetensors.torch import save_file
    from transformers import AutoModel, pipeline

    out, v1, image = sys.argv[1], sys.argv[2], PIL.Image.open(sys.argv[3])
    BOXES, ANSWERS = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    hub = {"revision": v1, "trust_remote_code": True}
    model = AutoModel.from_pretrained("org/name", **hub)
    save_file(model.state_dict(), f"{out}/v1.safetensors")
    matcher = pipeline("image-text-matching", model="org/name", **hub)
    retriever = pipeline("image-text-retrieval", model="org/name", **hub)
    retriever.build_index(texts=["a red circle", "two dogs running", "a blue square"])
    extractor = pipeline("feature-extraction", model="org/name", **hub)
    classifier = pipeline("zero-shot-image-classification", model="org/name", **hub)
    grounder = pipeline("visual-grounding", model="org/name", **hub)
    vqa = pipeline("visual-question-answering", model="org/vqa", revision="main", trust_remote_code=True)
    pipes = (model, matcher, matcher.model, retriever, extractor, classifier.model, grounder, vqa, vqa.model)
    grounding = grounder(image, "a red circle", boxes=BOXES)
    result = {
        "grounding": [grounding["box_index"], grounding["score"], grounding["heatmap"].sum().item()],
        "vqa": vqa(image, "what colour is it?", candidate_answers=ANSWERS, top_k=2),
        "modules": [type(obj).__module__.split(".")[0] for obj in pipes],
        "matching": matcher(image, "a red circle"),
        "retrieval": [r["index"] for r in retriever(image, top_k=3)],
        "image_features": extractor(image)["image_features"].tolist(),
        "zero_shot": sorted(r["label"] for r in classifier(image, candidate_labels=["dog", "cat"])),
    }
    json.dump(result, open(f"{out}/result.json", "w"))
    """
)


def environment_without_albef_hf(folder: pathlib.Path) -> str:
    """A virtual environment that reaches this one's packages (torch, transformers...) but not albef_hf.

    Its `.pth` adds this environment's site-packages folders to `sys.path` without running their `.pth` files,
    so an editable install of albef_hf there stays invisible; the script asserts that albef_hf cannot be found.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (purelib,) = folder.glob("lib/python*/site-packages")
    (purelib / "shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return str(folder / "bin" / "python")


def test_with_remote_code_the_hub_folder_serves_without_albef_hf(hub, tmp_path):
    python = environment_without_albef_hf(tmp_path / "venv")
    boxes, answers = [[0, 0, 24, 20], [20, 16, 28, 24]], ["red", "blue", "two", "yes"]
    result = run_fresh(
        python, WITHOUT_PACKAGE, hub, tmp_path, json.dumps(boxes), json.dumps(answers), package=False
    )
    assert result["modules"] == ["transformers_modules"] * 9
    loaded = load_file(tmp_path / "v1.safetensors")
    expected = hub["v1"].state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.items())

    image = random_images(1, seed=11)[0]
    folder = str(hub["v1_folder"])
    assert result["matching"] == pytest.approx(
        pipeline("image-text-matching", model=folder)(image, "a red circle")
    )
    retriever = pipeline("image-text-retrieval", model=folder)
    retriever.build_index(texts=["a red circle", "two dogs running", "a blue square"])
    assert result["retrieval"] == [r["index"] for r in retriever(image, top_k=3)]
    features = pipeline("feature-extraction", model=folder)(image)["image_features"]
    assert result["image_features"] == pytest.approx(features.tolist(), abs=1e-6)
    assert result["zero_shot"] == ["cat", "dog"]
    grounding = pipeline("visual-grounding", model=folder)(image, "a red circle", boxes=boxes)
    assert result["grounding"] == pytest.approx(
        [grounding["box_index"], grounding["score"], grounding["heatmap"].sum().item()], rel=1e-4
    )
    vqa = pipeline("visual-question-answering", model=str(hub["vqa_folder"]))
    expected = vqa(image, "what colour is it?", candidate_answers=answers, top_k=2)
    assert [r["answer"] for r in result["vqa"]] == [r["answer"] for r in expected]
    assert [r["score"] for r in result["vqa"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Upload side (no live Hub: HfApi calls are recorded)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_uploads(monkeypatch):
    """Replace the Hub calls of `HfApi` by recorders; each upload keeps the files it would send."""
    uploads, branches = [], []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        return Repo(repo_id if "/" in repo_id else f"user/{repo_id}")

    def create_branch(self, repo_id, branch, **kwargs):
        branches.append((repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        files = {
            os.path.relpath(os.path.join(root, name), folder_path): pathlib.Path(root, name).read_bytes()
            for root, _, names in os.walk(folder_path)
            for name in names
        }
        uploads.append({"repo_id": repo_id, "files": files, "message": commit_message, "revision": revision})
        return "recorded"

    for name, replacement in (
        ("create_repo", create_repo),
        ("create_branch", create_branch),
        ("upload_folder", upload_folder),
    ):
        monkeypatch.setattr(HfApi, name, replacement)
    return uploads, branches


def test_push_to_hub_would_send_model_processor_code_and_card_in_one_commit(recorded_uploads, tmp_path):
    uploads, branches = recorded_uploads
    torch.manual_seed(0)
    model, processor = AlbefForPreTraining(tiny_config()).eval(), tiny_processor()
    assert model.push_to_hub(REPO, processor=processor, model_card=CARD, revision="v1") == "recorded"
    (upload,) = uploads
    assert branches == [(REPO, "v1")] and upload["revision"] == "v1"
    files = upload["files"]
    assert set(files) == {"config.json", "model.safetensors", "README.md"} | PROCESSOR_FILES | CODE_FILES

    config = json.loads(files["config.json"])
    assert config["architectures"] == ["AlbefForPreTraining"]
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_albef.AlbefForPreTraining"
    assert set(config["custom_pipelines"]) == {
        "image-text-matching",
        "image-text-retrieval",
        "feature-extraction",
        "visual-grounding",
    }
    (tmp_path / "model.safetensors").write_bytes(files["model.safetensors"])
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in weights.items())
    assert files["README.md"].decode() == str(build_model_card(CARD))

    # the processor sends the same, and a model's default card names its task and class
    processor.push_to_hub("org/other", model=model)
    assert set(uploads[1]["files"]) == set(files)
    card = ModelCard(uploads[1]["files"]["README.md"].decode())
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "AlbefForPreTraining" in card.text
    assert "pretraining" in card.data.tags


def test_save_pretrained_with_push_to_hub_sends_the_complete_folder(recorded_uploads, tmp_path):
    uploads, _ = recorded_uploads
    model = AlbefModel(tiny_config())
    model.save_pretrained(tmp_path / "albef", push_to_hub=True, commit_message="first")
    (upload,) = uploads
    assert upload["repo_id"] == "user/albef" and upload["message"] == "first"
    assert set(upload["files"]) == {"config.json", "model.safetensors"} | BASE_CODE_FILES
    assert set(upload["files"]) == {path.name for path in (tmp_path / "albef").iterdir()}


def test_the_default_card_names_the_repository_whichever_push_to_hub_sends_it(recorded_uploads):
    uploads, _ = recorded_uploads
    model, processor = AlbefModel(tiny_config()), tiny_processor()
    model.push_to_hub("org/from-model", processor=processor, tags=["extra-tag"])
    processor.push_to_hub("org/from-processor", model=model)
    cards = [ModelCard(upload["files"]["README.md"].decode()) for upload in uploads]
    for card, repo in zip(cards, ("org/from-model", "org/from-processor"), strict=True):
        assert f'AlbefModel.from_pretrained("{repo}")' in card.text and "path/or/repo" not in card.text
        assert card.data.model_name == repo.split("/")[-1]
    assert "extra-tag" in cards[0].data.tags and "extra-tag" not in cards[1].data.tags
