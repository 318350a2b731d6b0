"""benchmarks/gpu_step.py in its reduced mode on the CPU: the GPU check runs end to end and its packed
log-probs agree with the plain path's (the bf16 numbers need a GPU: docs/benchmarks.md)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_step  # noqa: E402


def test_reduced_gpu_step_runs_every_cpu_variant_and_packed_agrees_with_plain(tmp_path):
    gpu_step.main(["--reduced", "--out", str(tmp_path / "gpu_step.json")])
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    steps = {row["variant"]: row for row in result["steps"]}
    assert set(steps) == {"multi-target sdpa", "plain", "trl-style"}  # FlexAttention has no CPU backward
    assert all(row["step_s"] > 0 and row["episode_tokens_per_s"] > 0 for row in steps.values())
    # 8 episodes, 4 to a shot set: the shots run twice instead of 16 times
    assert steps["multi-target sdpa"]["tokens_run_per_step"] < steps["plain"]["tokens_run_per_step"] / 2
    agreement = result["agreement"]["torch.float32"]["multi-target sdpa"]
    assert agreement["vs_plain_max_rel"] < 1e-5 and agreement["mean_abs_logp"] > 10
