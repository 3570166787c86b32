"""Two CPU processes (gloo) under torchrun: the teacher and the queues stay identical and hold both ranks' data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from trainer_helpers import downstream_evaluations

HERE = os.path.dirname(os.path.abspath(__file__))


def run_two_processes(mode: str, output_dir) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(HERE, "trainer_helpers.py"), mode, str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((output_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_process_pretraining_keeps_teacher_and_queues_in_sync(tmp_path):
    ranks = run_two_processes("distributed", tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    zero, one = ranks[0]["records"], ranks[1]["records"]
    assert [r["step"] for r in zero] == [1, 2, 3] == [r["step"] for r in one]
    global_batch = 2 * 2
    for step, (a, b) in enumerate(zip(zero, one, strict=True), start=1):
        assert a["teacher_digest"] == b["teacher_digest"] and a["teacher_first"] == b["teacher_first"]
        assert a["image_queue"] == b["image_queue"] and a["text_queue"] == b["text_queue"]
        assert a["ptr"] == b["ptr"] == step * global_batch % 16
        # the rows written this step are rank 0's teacher features followed by rank 1's
        written = np.array(a["image_queue"])[a["ptr"] - global_batch : a["ptr"]]
        assert np.allclose(written, np.array(a["enqueued"] + b["enqueued"]), atol=0)
        assert not np.allclose(a["enqueued"], b["enqueued"])  # the ranks did see different samples
    assert zero[0]["teacher_first"] != zero[-1]["teacher_first"]  # the EMA moved
    # both ranks' parts of each checkpoint were written before it was published whole
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint-", "_")))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    manifest = json.loads((tmp_path / "checkpoint-3" / "albef_checkpoint.json").read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "momentum_state.safetensors"} <= set(manifest["files"])
    assert manifest["run"]["world_size"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_two_process_downstream_evaluations_equal_the_single_process_ones(tmp_path):
    """VQA and grounding split their samples across the ranks and gather them; SNLI-VE runs transformers' loop."""
    ranks = run_two_processes("downstream_eval", tmp_path)
    single = json.loads(json.dumps(downstream_evaluations(str(tmp_path))))
    # transformers' loop averages the loss over padded batches (a duplicated sample counts): accuracy only for VE
    single["ve"]["metrics"].pop("eval_loss")
    for task in ("vqa", "grounding", "ve"):
        assert ranks[0][task] == ranks[1][task], task
        assert single[task]["metrics"] == pytest.approx(
            {key: ranks[0][task]["metrics"][key] for key in single[task]["metrics"]}
        ), task
        assert len(ranks[0][task]["predictions"]) == 5, task
    for task in ("vqa", "grounding"):
        for ours, theirs in zip(ranks[0][task]["predictions"], single[task]["predictions"], strict=True):
            assert ours.keys() == theirs.keys() and ours["index"] == theirs["index"]
            assert ours.get("answer") == theirs.get("answer") and ours.get("candidate") == theirs.get(
                "candidate"
            )
