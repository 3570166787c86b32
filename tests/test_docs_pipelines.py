"""The examples of docs/pipelines.md (the README's pipeline sections) run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"


def test_the_pipeline_examples_run(tmp_path, monkeypatch, capsys):
    code = "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    assert (tmp_path / "gallery-index" / "index.json").is_file()
    assert (tmp_path / "grounding.png").is_file()
    assert "'itm_probability'" in capsys.readouterr().out
