"""Write the episodes a model would be trained on, as JSONL, to see exactly what it will read.

    python -m jobs.build_episodes data=elix:/data/elix.jsonl out=episodes.jsonl shots=4 \
        tokenizer=/models/tiny max_length=1024 max_prompt_length=896

Each line: user_id, prompt, chosen, rejected, shots (those actually in the prompt, oldest first),
query, user_description, shots_dropped, query_source. The summary line counts what was left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from omegaconf import MISSING

from fspo_ray.config import ConfigError, parse_overrides, refuse_overwrite, run_job
from fspo_ray.data.episodes import build_episodes, default_passes
from fspo_ray.data.readers import default_shots, read_pairs, skipped_rows
from fspo_ray.data.tokenize import PromptStyle, episode_record, fit_episode, render_episode


@dataclass
class BuildEpisodesConfig:
    data: str = MISSING  # [format:]path, see fspo_ray/data/readers.py
    out: str = MISSING  # output JSONL
    overwrite: bool = False  # replace `out` if it already holds episodes
    shots: int | None = None  # default: the format's (roleplay 8, elix 4, review_Nshot N, dpo_json 0, canonical 4)
    split: str | None = None  # a split of a save_to_disk DatasetDict; "train" (or none) means R = 2(N+1) passes
    users: list[str] | None = None  # keep only these users
    passes: int | None = None  # default: 2(N+1) for training data, 1 for any other split
    seed: int = 0  # seeds which pairs form each episode
    preferred_only: bool = False  # shots show the preferred answer only
    description_mode: str = "none"  # none | generated | teacher_forced
    tokenizer: str | None = None  # a local Hugging Face tokenizer folder: turns on the length policy
    max_length: int = 2048  # with tokenizer: prompt + completion tokens
    max_prompt_length: int = 2048  # with tokenizer: prompt tokens


def main(argv: list[str]) -> dict:
    cfg = parse_overrides(BuildEpisodesConfig, argv)
    refuse_overwrite(cfg.out, cfg.overwrite)
    shots = cfg.shots if cfg.shots is not None else default_shots(cfg.data, cfg.split)
    passes = cfg.passes if cfg.passes is not None else default_passes(shots, cfg.split or "train")
    if passes < 1:
        raise ConfigError(f"passes must be >= 1, got {passes}")
    style = PromptStyle(cfg.preferred_only, cfg.description_mode)
    tokenizer = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)

    pairs = read_pairs(cfg.data, split=cfg.split, users=cfg.users)
    episodes, stats = build_episodes(pairs, shots, passes, cfg.seed)
    written = skipped = shots_dropped = 0
    with open(cfg.out, "w", encoding="utf-8") as f:
        for episode in episodes:
            if tokenizer is None:
                fitted = render_episode(episode, style)
            else:
                fitted = fit_episode(
                    episode, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, style=style
                )
                if fitted is None:
                    skipped += 1
                    continue
                shots_dropped += fitted.shots_dropped
            f.write(json.dumps(episode_record(episode, fitted)) + "\n")
            written += 1
    summary = {
        "episodes_written": written,
        "episodes_skipped_for_length": skipped,
        "shots_dropped_for_length": shots_dropped,
        "users": stats.users,
        "users_without_episode": stats.users_without_episode,
        "pairs_in_no_episode": stats.pairs_in_no_episode,
        "rows_skipped": skipped_rows([cfg.data], cfg.split),
    }
    not_pairs = "".join(f"; rows skipped ({why}): {n}" for why, n in sorted(summary["rows_skipped"].items()))
    print(
        f"wrote {written} episodes ({shots} shots, {passes} passes) of {stats.users} users to {cfg.out}; "
        f"dropped for length: {shots_dropped} shots, {skipped} episodes; "
        f"users with fewer than {shots + 1} pairs: {stats.users_without_episode}; "
        f"pairs in no episode: {stats.pairs_in_no_episode}{not_pairs}"
    )
    return summary


if __name__ == "__main__":
    run_job(main)
