"""Fixtures of the conversion tests: a tokenizer folder, and every task's tiny original checkpoint converted
once per session, through the three entry points in turn (the script in a fresh process, the CLI's `main`, the
Python API)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from albef_hf.conversion import convert_original_checkpoint, main

from .original_layout import SCRIPT, TINY_CONFIG, write_original_checkpoint, write_tokenizer

# How each task's fixture is converted: every entry point is exercised on real checkpoints.
ENTRY_POINTS = {
    "pretrain": "script",
    "retrieval": "api",
    "grounding": "main",
    "vqa": "api",
    "nlvr": "main",
    "ve": "api",
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _run_script(arguments: list[str]) -> None:
    repo_root = str(SCRIPT.parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("task ")


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tokenizer_dir):
    """`converted(task)`: the folder the converter wrote for the task's original checkpoint (task given
    explicitly only for grounding, whose layout is the retrieval one; read from the keys otherwise)."""
    folders: dict[str, Path] = {}
    work = tmp_path_factory.mktemp("converted")

    def convert(task: str) -> Path:
        if task not in folders:
            checkpoint = write_original_checkpoint(task, work)
            output = work / task
            arguments = [
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(output),
                "--config",
                str(TINY_CONFIG),
            ]
            arguments += ["--tokenizer", str(tokenizer_dir)] + (
                ["--task", task] if task == "grounding" else []
            )
            how = ENTRY_POINTS[task]
            if how == "script":
                _run_script(arguments)
            elif how == "main":
                assert main(arguments) == 0
            else:
                result = convert_original_checkpoint(
                    checkpoint, output, config=TINY_CONFIG, tokenizer=tokenizer_dir
                )
                assert result.task == task
            folders[task] = output
        return folders[task]

    return convert


@pytest.fixture(scope="session")
def pretrain_dir(converted) -> Path:
    return converted("pretrain")


@pytest.fixture(scope="session")
def retrieval_dir(converted) -> Path:
    return converted("retrieval")


@pytest.fixture(scope="session")
def grounding_dir(converted) -> Path:
    return converted("grounding")
