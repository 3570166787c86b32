"""Fixtures of the conversion tests: a tokenizer folder and the tiny original checkpoints, converted once per
session, each through a different entry point (the script in a subprocess, `main`, the Python API)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from albef_hf.conversion import convert_original_checkpoint, main

from .original_layout import FIXTURES, SCRIPT, TINY_CONFIG, write_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The faithful pretraining checkpoint converted by the command-line script, in a fresh process."""
    output = tmp_path_factory.mktemp("converted") / "pretrain"
    repo_root = str(SCRIPT.parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(FIXTURES / "pretrain.pth"),
        "--output",
        str(output),
        "--config",
        str(TINY_CONFIG),
        "--tokenizer",
        str(tokenizer_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "task pretrain" in done.stdout
    return output


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The retrieval checkpoint converted through the Python API, task read from the keys."""
    output = tmp_path_factory.mktemp("converted") / "retrieval"
    result = convert_original_checkpoint(
        FIXTURES / "retrieval.pth", output, config=TINY_CONFIG, tokenizer=tokenizer_dir
    )
    assert result.task == "retrieval"
    return output


@pytest.fixture(scope="session")
def grounding_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The grounding checkpoint (retrieval layout) converted through the CLI's `main`, task given."""
    output = tmp_path_factory.mktemp("converted") / "grounding"
    argv = ["--checkpoint", str(FIXTURES / "retrieval.pth"), "--output", str(output), "--task", "grounding"]
    assert main([*argv, "--config", str(TINY_CONFIG), "--tokenizer", str(tokenizer_dir)]) == 0
    return output
