"""The precision policy: bf16 autocast only where the hardware computes it natively, fp32 elsewhere."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from transformers import HfArgumentParser
from transformers.testing_utils import CaptureLogger

from albef_hf import precision
from albef_hf.demo.config import RECIPES, DemoConfig
from albef_hf.demo.run import training_arguments, with_recipe
from albef_hf.trainer import AlbefTrainingArguments

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(params=[True, False], ids=["native-bf16", "emulated-bf16"])
def native(request, monkeypatch) -> bool:
    """Pretend this CPU has (or lacks) AVX512-BF16/AMX, and that there is no GPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: request.param)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: request.param)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


def _arguments(tmp_path, **kwargs) -> tuple[AlbefTrainingArguments, str]:
    with CaptureLogger(precision.logger) as captured:
        args = AlbefTrainingArguments(str(tmp_path), report_to="none", **kwargs)
    return args, captured.out


def test_auto_follows_the_cpu(native, tmp_path):
    args, log = _arguments(tmp_path)
    assert args.bf16 is native
    assert log == ""
    # bf16 on a machine without a GPU is CPU autocast: the parent accepts it only with use_cpu
    assert args.use_cpu is native


def test_explicit_bf16_warns_only_where_emulated(native, tmp_path):
    args, log = _arguments(tmp_path, bf16=True)
    assert args.bf16 is True
    if native:
        assert log == ""
    else:
        assert "no native bf16" in log and precision.EMULATED_BF16_SLOWDOWN in log
        assert log.count("\n") == 1  # one warning


def test_explicit_fp32_is_kept(native, tmp_path):
    args, log = _arguments(tmp_path, bf16=False)
    assert args.bf16 is False and log == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], "auto"), (["--bf16"], True), (["--bf16", "true"], True), (["--bf16", "false"], False)],
)
def test_command_line(native, tmp_path, argv, expected):
    parser = HfArgumentParser(AlbefTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *argv]
    )
    assert args.bf16 is (native if expected == "auto" else expected)


def test_bad_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bf16 must be 'auto'"):
        AlbefTrainingArguments(str(tmp_path), bf16="sometimes")


def test_cuda_device_asks_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert precision.native_bf16_available("cuda") is supported
    assert precision.native_bf16_available("mps") is False


def test_demo_follows_the_policy(native, tmp_path):
    demo = with_recipe(DemoConfig(output_dir=str(tmp_path)))
    assert (demo.batch_size, demo.max_steps, demo.learning_rate) == RECIPES[native]
    args = training_arguments(demo)
    assert args.bf16 is native and args.learning_rate == RECIPES[native][2]
    fp32 = with_recipe(DemoConfig(output_dir=str(tmp_path), bf16="false"))
    assert (fp32.batch_size, fp32.max_steps, fp32.learning_rate) == RECIPES[False]
    assert training_arguments(fp32).bf16 is False


def test_example_scripts_follow_the_policy(native, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    utils = importlib.import_module("albef_example_utils")
    argv = ["--output_dir", str(tmp_path), "--report_to", "none"]
    *_, training_args = utils.parse_arguments(
        (utils.ModelArguments, utils.DataArguments, AlbefTrainingArguments), argv
    )
    assert training_args.bf16 is native
