"""A saved folder carries its code: it loads with trust_remote_code where albef_hf cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor

from albef_hf import AlbefForPreTraining, AlbefModel

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["albef_hf"] = None  # any import of the package now fails: only the folder's code can serve
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoProcessor
    from transformers import AutoModelForZeroShotImageClassification

    folder, inputs_path, outputs_path = sys.argv[1:]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    pretraining = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for obj in (config, pretraining, base, zero_shot, processor, processor.image_processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
    inputs = torch.load(inputs_path, weights_only=True)
    batch = processor(images=[img.numpy() for img in inputs["images"]], text=inputs["texts"], pairs=True)
    assert torch.equal(batch["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        outputs = {
            "logits_per_image": base(**batch).logits_per_image,
            "multimodal": pretraining.get_multimodal_features(
                batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
            ),
        }
    torch.save(outputs, outputs_path)
    """
)


def test_saved_folder_loads_with_remote_code_without_the_package(tmp_path):
    model = AlbefForPreTraining(tiny_config()).eval()
    processor = tiny_processor()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {"modeling_albef.py", "configuration_albef.py", "processing_albef.py"} <= set(os.listdir(folder))

    images = random_images(4)
    batch = processor(images=images, text=CAPTIONS, pairs=True)
    inputs = {
        "images": [torch.from_numpy(np.array(image)) for image in images],
        "texts": CAPTIONS,
        "pixel_values": batch["pixel_values"],
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(folder),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        base = AlbefModel.from_pretrained(folder).eval()
        torch.testing.assert_close(remote["logits_per_image"], base(**batch).logits_per_image)
        expected = model.get_multimodal_features(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        )
    torch.testing.assert_close(remote["multimodal"], expected)
