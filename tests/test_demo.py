"""The demo pipeline end to end at a reduced size, its training read live from Ray's metrics endpoint."""

import json
import math
import re
import threading

import httpx
import pytest
from conftest import free_port, start_local_ray

from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import bayes_optimal_choice

pytestmark = pytest.mark.slow

# The demo's users at a reduced size: each prefers a pole on 2 properties, and a pair need not show both, so one
# shot does not settle a user and a model that recalls one shot gains nothing from more. Held-out users flip no
# label here (make demo's flip 10%): after this run's 1,600 IPO steps, 4 noisy shots read no better than 1 (-1.3
# points [-5.4, +2.8]). At the demo's IPO rate (0.001) noise-free shots gained +2.7 to +7.3 points, by trajectory
# (the lower end fails); at 0.002, +14.7 [+10.6, +18.9] (docs/benchmarks.md). Held-out episodes: 64 users x 3
# windows of 4 shots x 4 targets = 768, scored at k = 0, 1, 2, 4; the paired interval is about ±4.
N = 768
SHOTS = 4
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
    k shots in the prompt, in the demo's prompt style and limits (preferred-only, 640/512 tokens), each episode
    in its own rows (the evaluation reads a window's 4 targets in one packed row)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.data.tokenize import PromptStyle, fit_episode

    episodes, _ = build_episodes(read_pairs(str(data)), shots=SHOTS, passes=1, seed=0, targets=4)
    tokenizer = AutoTokenizer.from_pretrained(out / "runs" / "ipo" / "LATEST")
    models = [AutoModelForCausalLM.from_pretrained(out / "runs" / run / "LATEST").eval() for run in ("ipo", "sft")]

    def logps(model, rows):
        """Each (prompt, completion)'s summed log-prob, in one right-padded batch: a causal model's positions
        before the padding do not see it."""
        width = max(len(prompt) + len(completion) for prompt, completion in rows)
        ids = torch.tensor([prompt + completion + [0] * (width - len(prompt) - len(completion))
                            for prompt, completion in rows])  # fmt: skip
        with torch.no_grad():
            logits = model(ids).logits.log_softmax(-1)
        return [logits[i, len(prompt) - 1 : len(prompt) + len(completion) - 1].gather(-1, torch.tensor([completion]).T)
                .sum().item() for i, (prompt, completion) in enumerate(rows)]  # fmt: skip

    right: dict[int, list[bool]] = {k: [] for k in ks}
    style = PromptStyle(preferred_only=True)
    for episode in episodes:
        rows = []
        for k in ks:
            tokens = fit_episode(dataclasses.replace(episode, shots=episode.shots[:k]), tokenizer, max_length=640,
                                 max_prompt_length=512, style=style).tokens  # fmt: skip
            rows += [(tokens["prompt_ids"], tokens["chosen_ids"]), (tokens["prompt_ids"], tokens["rejected_ids"])]
        policy, reference = (logps(model, rows) for model in models)
        for i, k in enumerate(ks):
            chosen, rejected = 2 * i, 2 * i + 1
            margin = (policy[chosen] - reference[chosen]) - (policy[rejected] - reference[rejected])
            right[k].append(margin > 0)
    assert [len(v) for v in right.values()] == [N] * len(ks)
    return right


def test_demo_at_reduced_size(tmp_path, monkeypatch, capsys):
    import ray

    from jobs.demo import main

    port = free_port()
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")  # Ray's default 10 s outlasts this short run
    if ray.is_initialized():  # the Ray that earlier modules shared (conftest): this one starts with the setting
        ray.shutdown()
    start_local_ray()
    capsys.readouterr()  # the test's own Ray start-up lines: what follows is the demo's console
    seen: dict = {}
    stop = threading.Event()
    try:
        watcher = threading.Thread(target=watch_metrics, args=(ray.nodes()[0]["MetricsExportPort"], seen, stop))
        watcher.start()
        result = main([f"out={tmp_path}", "n_train_users=128", "n_test_users=64", "pairs_per_user=24",
                       "dims_per_user=2", "label_noise=0", f"shots={SHOTS}", "min_shots=2",
                       "targets_per_prompt=4", "passes=9", "max_length=640", "max_prompt_length=512",
                       "sft_examples=3200", "ipo_examples=12800", "ipo_lr=0.002", f"eval_episodes={N}",
                       "eval_queries=4", f"port={port}"])  # fmt: skip
    finally:
        stop.set()
        watcher.join()
        ray.shutdown()
    captured = capsys.readouterr()
    printed = captured.out

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    rows = report["accuracy_by_shots"]
    assert [(r["k"], r["n"]) for r in rows] == [(0, N), (1, N), (2, N), (4, N)]
    # Each episode's verdict at 0, 1 and 4 shots, scored here with plain transformers (the IPO export against
    # its reference, the SFT export), gives the accuracies and the paired gains the report states.
    right = episode_verdicts(tmp_path, data=tmp_path / "data" / "test.jsonl", ks=(0, 1, SHOTS))
    by_k = {r["k"]: r["accuracy"] for r in rows}
    assert [by_k[k] for k in (0, 1, SHOTS)] == [sum(right[k]) / N for k in (0, 1, SHOTS)]
    for key, fewer in (("gain_over_zero_shots", 0), ("gain_over_one_shot", 1)):
        differences = [100.0 * (more - less) for more, less in zip(right[SHOTS], right[fewer])]
        mean = sum(differences) / N
        half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in differences) / (N - 1)) / math.sqrt(N)
        gain = report[key]
        assert (gain["k"], gain["over"], gain["n"]) == (SHOTS, fewer, N)
        assert gain["points"] == pytest.approx(mean, abs=1e-9)
        assert gain["ci"] == pytest.approx([mean - half, mean + half])
    # It learned to read several shots, not to recall one: with 4 of a held-out user's choices it ranks their
    # preferred answer first more often than with 1, by more than the paired 95% interval leaves to chance.
    # A model that reads one shot (the latest, or any) gains nothing from the other three.
    gain = report["gain_over_one_shot"]
    assert gain["ci"][0] > 0, gain
    assert f"reading several: {gain['points']:+.1f} points of accuracy at {SHOTS} shots over 1 shot" in printed
    # The ideal reader of the same shots: a coin at 0 shots, rising with every shot (a pair need not show both
    # of a user's properties), and short of certainty at 4.
    ideal = [r["accuracy"] for r in report["bayes_optimal_by_shots"]]
    assert ideal[0] == 0.5 and ideal[0] < ideal[1] < ideal[2] < ideal[3] < 1.0, ideal
    # How far below that reader the model is, on the same episodes (a paired difference), as the report states it.
    users = json.loads((tmp_path / "data" / "users.json").read_text())
    episodes, _ = build_episodes(read_pairs(str(tmp_path / "data" / "test.jsonl")), shots=SHOTS, passes=1, seed=0,
                                 targets=4)  # fmt: skip
    for k in (1, SHOTS):
        reads = [bayes_optimal_choice([(s.preferred, s.dispreferred) for s in e.first_shots(k).shots],
                                      (e.query.preferred, e.query.dispreferred), 2, label_noise=0.0,
                                      preferred_only=True) for e in episodes]  # fmt: skip
        differences = [float(best) - float(model) for best, model in zip(reads, right[k])]
        mean = sum(differences) / N
        half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in differences) / (N - 1)) / math.sqrt(N)
        gap = next(r for r in report["bayes_optimal_by_shots"] if r["k"] == k)["model_gap"]
        assert gap["n"] == N and gap["gap"] == pytest.approx(mean)
        assert gap["ci"] == pytest.approx([mean - half, mean + half])
        assert f"{gap['gap']:+.3f} [{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}]" in printed  # the table's "below it"
    # The same gap at 4 shots, split by whether some training user holds the held-out user's pole combination.
    sides = next(r for r in report["bayes_optimal_by_shots"] if r["k"] == SHOTS)["model_gap_by_combination"]
    shown = []
    for side, is_novel in (("trained", False), ("novel", True)):
        kept = [d for d, e in zip(differences, episodes) if users[e.user_id]["novel_combination"] is is_novel]
        mean = sum(kept) / len(kept)
        half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in kept) / (len(kept) - 1)) / math.sqrt(len(kept))
        assert sides[side]["n"] == len(kept) and sides[side]["gap"] == pytest.approx(mean)
        assert sides[side]["ci"] == pytest.approx([mean - half, mean + half])
        shown.append(f"{side} {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] on {len(kept)}")
    assert 0 < sides["novel"]["n"] < N
    assert (f"below the ideal reader at {SHOTS} shots, by whether a training user holds the user's pole "
            f"combination: {'; '.join(shown)}") in printed  # fmt: skip
    assert (tmp_path / "eval" / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "eval" / "per_user.csv").read_text().startswith("user_id,")

    # IPO starts at its reference: its precomputed scores equal the policy's own, so every reward is zero
    # (up to float noise: the reference pass batches episodes differently from the evaluation).
    ipo_metrics = [json.loads(line) for line in (tmp_path / "runs" / "ipo" / "metrics.jsonl").read_text().splitlines()]
    assert ipo_metrics[0]["step"] == 0
    for key in ("chosen", "rejected", "margins"):
        assert abs(ipo_metrics[0][f"rewards_eval/{key}"]) < 1e-5, key
    assert [m["counters/examples"] for m in ipo_metrics if "counters/examples" in m][-1] == 12800

    # The personalized answer came over HTTP from the trained model, with the user's 4 shots in its prompt.
    personalized, base = result["personalized"], result["base"]
    assert personalized["shots_used"] == SHOTS and personalized["model"].endswith("ipo")
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
