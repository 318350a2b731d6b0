"""How well a demo's model reads each property: on the held-out pairs whose answers differ in one property
only, the share its implicit reward ranks right with k shots in the prompt, beside the ideal reader on the
same pairs. A property the model never learned to read sits near 0.5 while the others sit near the reader.
Each episode is packed in a row of its own and scored as training scores it (`packed_logps`; the evaluation
packs a window's targets into one row: the verdicts agree but for margins within rounding of 0). Run after
`make demo`:

    .venv/bin/python benchmarks/reading_by_property.py demo=runs/demo k=6
"""

import collections
import dataclasses
import json
import os
import sys

import torch
from omegaconf import OmegaConf

from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import DIMENSIONS, bayes_optimal_choice, detect_properties
from fspo_ray.attention import packed_attention
from fspo_ray.data.tokenize import PromptStyle, fit_episode
from fspo_ray.logprobs import pack, packed_logps
from fspo_ray.models import load_for_inference, padding_id

# The demo's episodes and limits (jobs/demo.yaml): 6-shot windows with 4 targets, preferred-only prompts.
DEFAULTS = dict(demo="runs/demo", k=6, shots=6, targets=4, seed=0, max_length=768, max_prompt_length=640, batch=16)


def main(argv: list[str]) -> None:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    users = json.load(open(os.path.join(cfg.demo, "data", "users.json")))
    episodes, _ = build_episodes(read_pairs(os.path.join(cfg.demo, "data", "test.jsonl")), shots=cfg.shots,
                                 passes=1, seed=cfg.seed, targets=cfg.targets)  # fmt: skip
    runs = os.path.join(cfg.demo, "runs")
    attention = packed_attention("cuda" if torch.cuda.is_available() else "cpu")  # the kernel training scores with
    policy, tokenizer, device = load_for_inference(os.path.join(runs, "ipo", "LATEST"), attention=attention)
    reference, _, _ = load_for_inference(os.path.join(runs, "sft", "LATEST"), attention=attention)
    style = PromptStyle(preferred_only=True)
    scored = []  # (the property the pair differs in, its tokens, the ideal reader's credit)
    for episode in episodes:
        won, lost = detect_properties(episode.query.preferred), detect_properties(episode.query.dispreferred)
        differing = [d for d in DIMENSIONS if won[d] != lost[d]]
        if len(differing) != 1:
            continue
        shown = dataclasses.replace(episode, shots=episode.shots[: cfg.k])
        tokens = fit_episode(shown, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                             style=style).tokens  # fmt: skip
        user = users[episode.user_id]
        ideal = bayes_optimal_choice([(s.preferred, s.dispreferred) for s in shown.shots],
                                     (episode.query.preferred, episode.query.dispreferred), len(user["preferences"]),
                                     label_noise=user["label_noise"], preferred_only=True)  # fmt: skip
        scored.append((differing[0], tokens, ideal))
    verdicts = collections.defaultdict(list)  # {property: [(model right, ideal reader's credit)]}
    for start in range(0, len(scored), cfg.batch):
        chunk = scored[start : start + cfg.batch]
        batch = pack(*([t[key] for _, t, _ in chunk] for key in ("prompt_ids", "chosen_ids", "rejected_ids")),
                     pad_token_id=padding_id(tokenizer), device=device)  # fmt: skip
        with torch.no_grad():
            policy_logps, reference_logps = packed_logps(policy, batch), packed_logps(reference, batch)
        ratios = (policy_logps - reference_logps).tolist()  # chosen..., rejected...
        for i, (dim, _, ideal) in enumerate(chunk):
            verdicts[dim].append((ratios[i] > ratios[len(chunk) + i], ideal))
    print(f"held-out pairs that differ in one property, {cfg.k} shots: the share ranked right")
    print(f"{'property':<10}{'pairs':<7}{'model':<8}ideal reader")
    for dim in DIMENSIONS:
        pairs = verdicts[dim]
        model, ideal = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        print(f"{dim:<10}{len(pairs):<7}{model:<8.3f}{ideal:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
