"""Two CPU processes (gloo) under torchrun: the teacher and the queues stay identical and hold both ranks' data."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_pretraining_keeps_teacher_and_queues_in_sync(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(HERE, "trainer_helpers.py"), "distributed", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
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
