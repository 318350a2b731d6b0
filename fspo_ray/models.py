"""Models and tokenizers that need no hub: built locally, for tests and demos."""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"


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
