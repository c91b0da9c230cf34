"""The embedded default tokenizer: one token per character, built locally with ``tokenizers``.

The vocabulary is the four special tokens followed by every printable ASCII character (the 95
from space to ``~``), tab and newline: 101 entries in all. It covers the digits, letters, space
and the punctuation the built-in tasks use (``+ - * / = ( ) , . : ? # \\ { }``). Encoding splits
text into characters (a BPE model with no merges); decoding concatenates them back (a ``Fuse``
decoder), so ``decode(encode(text)) == text`` exactly for any ASCII text. Characters outside the
vocabulary become ``<unk>``.

No special token is added on encoding: whoever builds the model input (the sampler, the SFT
collator) decides whether to prepend ``<bos>`` and append ``<eos>``. The padding side is also
theirs to set (left for prompts).
"""

from __future__ import annotations

import string
from typing import Any

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: Every character of the vocabulary, in id order after the special tokens.
CHARACTERS: str = string.digits + string.ascii_letters + string.punctuation + " \t\n"


def build_char_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3 ``<unk>``).

    ``model_max_length`` is recorded on the tokenizer (the tiny model's context length).
    The result round-trips text exactly: ``tok.decode(tok(text).input_ids) == text``.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    # BPE with no merges and no pre-tokenizer: the whole text is one "word" split into its
    # characters, spaces and newlines included, and nothing is ever merged back.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    core.decoder = decoders.Fuse()  # concatenate tokens, no spaces in between
    core.add_special_tokens(list(SPECIAL_TOKENS))
    fast: Any = PreTrainedTokenizerFast  # its __init__ is untyped in transformers 5
    tokenizer: PreTrainedTokenizerFast = fast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
