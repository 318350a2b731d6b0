"""The demo pipeline end to end at a reduced size, its training read live from Ray's metrics endpoint."""

import json
import math
import re
import socket
import threading

import httpx
import pytest

pytestmark = pytest.mark.slow

# Held-out episodes: 32 users x 16 pairs / (3 shots + 1). With 64 (16 users) the paired interval of the gain from
# shots was about ±15 points, and a machine with AVX-512 kernels trained a model whose 14-point gain it did not clear.
N = 128
SAMPLE = re.compile(r"^(ray_fspo_\w+)\{(.*)\} (\S+)$")


def watch_metrics(port: int, seen: dict, stop: threading.Event) -> None:
    """What the dashboard's Prometheus scrape sees: {(metric, run tag): values} while the demo runs."""
    while not stop.is_set():
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        for line in text.splitlines():
            sample = SAMPLE.match(line)
            if sample:
                run = re.search(r'run="([^"]*)"', sample[2])
                seen.setdefault((sample[1], run[1] if run else None), set()).add(float(sample[3]))
        stop.wait(1.0)


def episode_verdicts(out, data, ks) -> dict[int, list[bool]]:
    """{k: whether the implicit reward ranks the preferred answer first, per held-out episode}, with the first
    k shots in the prompt, in the demo's prompt style and limits (preferred-only, 512/384 tokens)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.data.episodes import build_episodes
    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.tokenize import PromptStyle, fit_episode

    episodes, _ = build_episodes(read_pairs(str(data)), shots=3, passes=1, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(out / "runs" / "ipo" / "LATEST")
    models = [AutoModelForCausalLM.from_pretrained(out / "runs" / run / "LATEST").eval() for run in ("ipo", "sft")]

    def logp(model, prompt, completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        return sum(logits[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))

    right: dict[int, list[bool]] = {}
    for k in ks:
        for episode in episodes:
            variant = dataclasses.replace(episode, shots=episode.shots[:k])
            tokens = fit_episode(variant, tokenizer, max_length=512, max_prompt_length=384,
                                 style=PromptStyle(preferred_only=True)).tokens  # fmt: skip
            pc, rc = (logp(m, tokens["prompt_ids"], tokens["chosen_ids"]) for m in models)
            pr, rr = (logp(m, tokens["prompt_ids"], tokens["rejected_ids"]) for m in models)
            right.setdefault(k, []).append((pc - rc) - (pr - rr) > 0)
    assert [len(v) for v in right.values()] == [N] * len(ks)
    return right


def test_demo_at_reduced_size(tmp_path, monkeypatch, capsys):
    import ray

    from jobs.demo import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")  # Ray's default 10 s outlasts this short run
    if ray.is_initialized():  # the Ray that earlier modules shared (conftest): this one starts with the setting
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    capsys.readouterr()  # the test's own Ray start-up lines: what follows is the demo's console
    seen: dict = {}
    stop = threading.Event()
    try:
        watcher = threading.Thread(target=watch_metrics, args=(ray.nodes()[0]["MetricsExportPort"], seen, stop))
        watcher.start()
        # The reduced run keeps the recipe its size was measured with (constant lr, no NLL term): the shipped
        # recipe was measured at full size only.
        result = main([f"out={tmp_path}", "n_train_users=64", "n_test_users=32", "sft_examples=400",
                       "ipo_examples=800", "ipo_lr=1e-3", "ipo_sft_weight=0", "lr_schedule=constant",
                       f"eval_episodes={N}", "eval_queries=4", f"port={port}"])  # fmt: skip
    finally:
        stop.set()
        watcher.join()
        ray.shutdown()
    captured = capsys.readouterr()
    printed = captured.out

    # Evaluation: 32 held-out users x 16 pairs / (3 shots + 1) = 128 episodes, each scored at every k.
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    rows = report["accuracy_by_shots"]
    assert [(r["k"], r["n"]) for r in rows] == [(0, N), (1, N), (2, N), (3, N)]
    # The gain over 0 shots is measured on the same episodes: recomputed here from each episode's verdict at 0
    # and at 3 shots, scored with plain transformers (the IPO export against its reference, the SFT export).
    right = episode_verdicts(tmp_path, data=tmp_path / "data" / "test.jsonl", ks=(0, 3))
    assert [rows[0]["accuracy"], rows[-1]["accuracy"]] == [sum(right[0]) / N, sum(right[3]) / N]
    differences = [100.0 * (three - zero) for three, zero in zip(right[3], right[0])]
    mean = sum(differences) / N
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in differences) / (N - 1)) / math.sqrt(N)
    gain = report["gain_over_zero_shots"]
    assert (gain["k"], gain["n"]) == (3, N) and gain["points"] == pytest.approx(mean, abs=1e-9)
    assert gain["ci"] == pytest.approx([mean - half, mean + half])
    # It learned to read the shots: with 3 of a held-out user's choices it ranks their preferred answer first
    # more often than with none, by more than the paired 95% interval leaves to chance.
    assert gain["ci"][0] > 0, gain
    assert f"learning from shots: {gain['points']:+.1f} points of accuracy at 3 shots over 0 shots" in printed
    # The ideal reader of the same shots: every held-out user is settled by one shot (one cared property).
    assert [r["accuracy"] for r in report["bayes_optimal_by_shots"]] == [0.5, 1.0, 1.0, 1.0]
    assert (tmp_path / "eval" / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "eval" / "per_user.csv").read_text().startswith("user_id,")

    # IPO starts at its reference: its precomputed scores equal the policy's own, so every reward is zero
    # (up to float noise: the reference pass batches episodes differently from the evaluation).
    ipo_metrics = [json.loads(line) for line in (tmp_path / "runs" / "ipo" / "metrics.jsonl").read_text().splitlines()]
    assert ipo_metrics[0]["step"] == 0
    for key in ("chosen", "rejected", "margins"):
        assert abs(ipo_metrics[0][f"rewards_eval/{key}"]) < 1e-5, key
    assert [m["counters/examples"] for m in ipo_metrics if "counters/examples" in m][-1] == 800

    # The personalized answer came over HTTP from the trained model, with the user's 3 shots in its prompt.
    personalized, base = result["personalized"], result["base"]
    assert personalized["shots_used"] == 3 and personalized["model"].endswith("ipo")
    assert base["shots_used"] == 0
    assert f"--- personalized model:\n{personalized['response']}\n" in printed

    # The console holds our stage lines, bars and results only, and ends with where everything is; Ray's
    # INFO lines, warnings and the workers' output went to the demo's log.
    console = captured.out + captured.err
    for noise in ("INFO ", "Warning", "WARNING", "RayTrainWorker", "(raylet)", "core_worker"):
        assert noise not in console, noise
    assert len(console.split("\n")) < 60  # one screen (a bar redraws its own line with \r)
    assert printed.rstrip().splitlines()[-3:][0].startswith(f"report: {tmp_path}/eval/report.json  plot: ")
    assert f"model: {tmp_path}/runs/ipo/LATEST" in printed and "done in" in printed.splitlines()[-1]
    log = (tmp_path / "demo.log").read_text()
    assert "RayTrainWorker" in log and "[ipo] epoch 0 step" in log and "INFO" in log

    # The dashboard saw both runs live: every training gauge, and values that the run logged.
    for run in ("sft", "ipo"):
        for name in ("loss", "examples_per_second", "tokens_per_second"):
            assert seen.get((f"ray_fspo_train_{name}", run)), f"no {name} for {run} in {sorted(seen)}"
    assert seen.get(("ray_fspo_train_reward_accuracy", "ipo"))
    logged = [m["loss/train"] for m in ipo_metrics if "loss/train" in m]
    assert any(value == pytest.approx(v, rel=1e-6) for value in seen[("ray_fspo_train_loss", "ipo")] for v in logged)
