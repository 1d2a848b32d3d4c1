"""The built-in models' tokenizers: a BPE learnt from docstrings, its chat template, the Llama-3-sized one."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator

from reflectevo.errors import ModelLoadError
from reflectevo.models.builtin.build import _build_once
from reflectevo.models.builtin.generic import stdlib_docstrings
from reflectevo.models.cache import cache_dir

# The chat format of the built-in tokenizers. The {% generation %} markers let TRL compute
# assistant-only losses; transformers renders templates with trim_blocks, hence the explicit '\n'.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
PAD, END = "<|pad|>", "<|end|>"
SPECIAL_TOKENS = [PAD, END, "<|user|>", "<|assistant|>", "<|system|>"]

# One training example: the chat messages of the prompt, then the assistant's completion.
Pair = tuple[list[dict[str, str]], str]


# ---- tokenizer ---------------------------------------------------------------------------------
def train_bpe(texts: Iterator[str] | list[str], vocab_size: int):
    """A byte-level BPE (every byte has a token, so no text is ever unknown) with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def wrap_tokenizer(bpe):
    """The transformers tokenizer around a trained BPE: pad, eos and the chat template set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, eos_token=END, bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_pair(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + end token, and labels that mask the prompt (-100)."""
    messages, completion = pair
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + END, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


# ---- builtin:random-1b and builtin:random-8b ------------------------------------------------------
LLAMA3_VOCAB_SIZE = 128_256
TOKENIZER_BUILDER_VERSION = "llama3-vocab-1"
TRAINED_MERGES_VOCAB = 8192  # the BPE part learnt from docstrings; filler tokens make up the rest


def llama3_vocab_tokenizer():
    """A tokenizer with exactly Llama 3's 128,256 ids, every one of which decodes to text.

    A byte-level BPE learnt from stdlib docstrings, then padded with filler tokens (short strings
    of the byte-level alphabet, so they decode to bytes like any other token). Built once and kept
    in ``cache_dir()/models``.
    """
    from transformers import AutoTokenizer

    digest = hashlib.sha256(
        json.dumps(
            [TOKENIZER_BUILDER_VERSION, LLAMA3_VOCAB_SIZE, TRAINED_MERGES_VOCAB, SPECIAL_TOKENS, CHAT_TEMPLATE]
        ).encode()
    )
    for doc in stdlib_docstrings():
        digest.update(json.dumps(doc).encode())
    final = cache_dir() / "models" / f"llama3-vocab-{digest.hexdigest()[:16]}"
    _build_once(
        final,
        "tokenizer.json",
        f"the {LLAMA3_VOCAB_SIZE}-token tokenizer in {final}",
        lambda staging: _padded_tokenizer(LLAMA3_VOCAB_SIZE).save_pretrained(staging),
    )
    return AutoTokenizer.from_pretrained(final)


def _padded_tokenizer(size: int):
    from tokenizers import Tokenizer, pre_tokenizers

    bpe = train_bpe(list(stdlib_docstrings()), TRAINED_MERGES_VOCAB)
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = bpe.get_vocab_size(with_added_tokens=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # two-character strings first (65,536 of them), then three-character ones, skipping learnt tokens
    for length in (2, 3):
        for chars in itertools.product(alphabet, repeat=length):
            if next_id == size:
                break
            token = "".join(chars)
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
    if next_id != size:
        raise ModelLoadError(f"could not pad the tokenizer to {size} ids (reached {next_id})")
    return wrap_tokenizer(Tokenizer.from_str(json.dumps(data)))
