"""The generation engines on a tiny random-weight Llama built here: no hub, no network, CPU only.

The model's text is noise, but it is deterministic noise, which is what these tests need: batching,
seeding, resume, sharding and stops are checked by comparing outputs byte for byte.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reflectevo.config import GenerationParams
from reflectevo.errors import DuplicateKeyError, GenerationError, ReplayMissingError, SettingsError, StoreMismatchError
from reflectevo.generation.decoding import DECODER_VERSION, prefill_segments, shared_groups
from reflectevo.generation.engines import ReplayEngine, TransformersEngine, make_engine
from reflectevo.generation.requests import GenerationOutput, GenerationRequest, GenerationSettings
from reflectevo.generation.store import batch_seed, load_store, merge_shards, plan_batches, read_outputs, write_outputs

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]
SAMPLING = GenerationSettings(n=2, temperature=1.0, max_new_tokens=12, seed=7)
GREEDY = GenerationSettings(max_new_tokens=16)


def build_tiny(folder: Path) -> None:
    """A byte-level BPE tokenizer with a chat template and a 2-layer random Llama, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [inspect.getdoc(json), inspect.getdoc(textwrap), "Thought: it is B.\nAction: Finish[B]"] * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainer=trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    # a wide initialisation spreads the logits, so greedy choices are far from ties
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def make_requests(count: int, prefix: str = "q") -> list[GenerationRequest]:
    """Prompts of uneven lengths, so batches need real left padding."""
    return [
        GenerationRequest(f"{prefix}{i:03d}", [{"role": "user", "content": "word " * (i * 7 % 23) + f"question {i}?"}])
        for i in range(count)
    ]


def engine(tiny, **options) -> TransformersEngine:
    model, tokenizer = tiny
    return TransformersEngine(model, tokenizer, progress=False, **options)


def generate_decoder(tiny, **options) -> TransformersEngine:
    """An engine that decodes with model.generate on the padded batch (the decoder before the loop)."""
    made = engine(tiny, **options)
    made.decoder = "generate"
    return made


def one_rest_call(made: TransformersEngine) -> TransformersEngine:
    """``made``, prefilling every prompt's rest in one call (tests that count the prefill calls)."""
    made.decode_options = dataclasses.replace(made.decode_options, prefill_call_tokens=10**9)
    return made


def forward_shapes(model):
    """Record the input_ids shape of every forward call of ``model``; returns (shapes, hook)."""
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, hook


def as_bytes(outputs: list[GenerationOutput], path: Path) -> bytes:
    return write_outputs(path, outputs).read_bytes()


# ---- settings and requests ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n": 2, "temperature": 0.0}, "need temperature > 0"),
        ({"n": 0}, "n must be a positive integer"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": 8, "min_new_tokens": 9}, "min_new_tokens"),
        ({"stop": ("",)}, "stop strings"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_are_rejected(bad, message):
    with pytest.raises(SettingsError, match=message):
        GenerationSettings(**bad)


def test_settings_follow_the_params_section_and_record_stop_as_a_list():
    params = GenerationParams(temperature=0.7, top_p=0.9, max_new_tokens=33)
    settings = GenerationSettings.from_params(params, n=3, stop=["\nObservation"], seed=5)
    assert (settings.temperature, settings.top_p, settings.max_new_tokens, settings.n) == (0.7, 0.9, 33, 3)
    assert settings.to_dict()["stop"] == ["\nObservation"] and settings.stop == ("\nObservation",)


def test_duplicate_keys_are_an_error(tiny):
    requests = make_requests(3) + [make_requests(2)[1]]
    with pytest.raises(DuplicateKeyError, match="q001"):
        engine(tiny).generate(requests, GREEDY, stage="s")
    with pytest.raises(DuplicateKeyError):
        ReplayEngine([]).generate(requests, GREEDY, stage="s")


def test_plan_is_length_sorted_with_ties_by_key_and_seeds_depend_on_first_key():
    keys = ["b", "a", "c", "d", "e"]
    ids = [[1, 2], [1, 2], [1, 2, 3], [1], [1, 2, 3, 4]]
    plan = plan_batches(keys, keys, ids, 2)
    assert [batch.keys for batch in plan] == [("e", "c"), ("a", "b"), ("d",)]
    assert batch_seed(0, "s", "a") != batch_seed(0, "s", "b") != batch_seed(1, "s", "b")
    assert batch_seed(0, "s", "a") == batch_seed(0, "s", "a") < 2**64


def test_plan_keeps_prompts_with_the_same_opening_together():
    """Two tasks' prompts (openings 7 and 8) of interleaved lengths: each task's prompts form their own
    batches, the task with the longest prompt first, longest first within a task; no groups without."""
    keys = [f"k{i}" for i in range(6)]
    ids = [[7, 7, 7, 1], [8, 8, 8, 1, 2, 3], [7, 7, 7, 1, 2], [8, 8, 8, 1], [7, 7, 7, 1, 2, 3, 4], [8, 8, 8, 1, 2]]
    grouped = plan_batches(keys, keys, ids, 3, group_tokens=3)
    assert [batch.keys for batch in grouped] == [("k4", "k2", "k0"), ("k1", "k5", "k3")]
    plain = plan_batches(keys, keys, ids, 3, group_tokens=0)
    assert [batch.keys for batch in plain] == [("k4", "k1", "k2"), ("k5", "k0", "k3")]


# ---- what an output says -----------------------------------------------------------------------
def test_outputs_record_prompt_settings_and_counts(tiny):
    tokenizer = tiny[1]
    requests = make_requests(5)
    outputs = engine(tiny, batch_size=4).generate(requests, GREEDY, stage="first", seed=3)
    assert [o.key for o in outputs] == [r.key for r in requests]  # request order, not plan order
    for request, output in zip(requests, outputs):
        prompt = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        assert output.prompt == prompt and output.prompt.endswith("<|assistant|>\n")
        assert output.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert output.settings == {**GREEDY.to_dict(), "seed": 3}
        assert (output.engine, output.stage, output.sample) == ("transformers", "first", 0)
        assert output.finish_reason == "length" and output.new_tokens == GREEDY.max_new_tokens
    assert sorted({o.batch for o in outputs}) == [0, 1]


def test_batched_greedy_equals_one_by_one(tiny):
    requests = make_requests(13)
    batched = engine(tiny, batch_size=8).generate(requests, GREEDY, stage="s")
    single = engine(tiny, batch_size=1).generate(requests, GREEDY, stage="s")
    assert len({o.prompt_tokens for o in batched}) > 5  # uneven lengths: padding really happened
    assert [o.text for o in batched] == [o.text for o in single]
    assert all(len(o.text) > 0 for o in batched)


def test_stop_string_cuts_the_text_and_ends_the_row_early(tiny):
    request = make_requests(4)[3:]
    free = engine(tiny).generate(request, GREEDY, stage="s")[0]
    stop = next(m.group() for m in re.finditer(r"[A-Za-z]{2,}", free.text) if m.start() >= 2)  # a word the model writes
    stopped = engine(tiny).generate(request, GenerationSettings(max_new_tokens=16, stop=("zzzq", stop)), stage="s")[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.new_tokens < free.new_tokens


def test_eos_and_length_finish_reasons(tiny):
    model, tokenizer = tiny
    request = make_requests(2)[1:]
    free = engine(tiny).generate(request, GREEDY, stage="s")[0]
    assert free.finish_reason == "length" and free.new_tokens == GREEDY.max_new_tokens
    # a copy of the model whose end-of-sequence token is a token it writes anyway (first seen at `at`)
    prompt_ids = tokenizer(free.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    written = model.generate(prompt_ids, max_new_tokens=16, do_sample=False)[0, prompt_ids.shape[1] :].tolist()
    at = next(i for i in range(2, 16) if written[i] not in written[:i])
    ending = copy.deepcopy(model)
    ending.generation_config.eos_token_id = written[at]
    ended = TransformersEngine(ending, tokenizer, progress=False).generate(request, GREEDY, stage="s")[0]
    assert ended.finish_reason == "eos" and ended.new_tokens == at + 1
    assert free.text.startswith(ended.text) and len(ended.text) < len(free.text)
    # min_new_tokens keeps that token from ending the row before the minimum
    forced = TransformersEngine(ending, tokenizer, progress=False).generate(
        request, GenerationSettings(max_new_tokens=16, min_new_tokens=16), stage="s"
    )[0]
    assert forced.finish_reason == "length" and forced.new_tokens == 16


def test_samples_differ_and_are_reproducible(tiny):
    requests = make_requests(3)
    first = engine(tiny, batch_size=4).generate(requests, SAMPLING, stage="s")
    again = engine(tiny, batch_size=4).generate(requests, SAMPLING, stage="s")
    other_seed = engine(tiny, batch_size=4).generate(requests, SAMPLING, stage="s", seed=8)
    assert [(o.key, o.sample) for o in first] == [(r.key, s) for r in requests for s in (0, 1)]
    assert first == again
    for request in requests:
        texts = [o.text for o in first if o.key == request.key]
        assert len(set(texts)) == 2
    assert [o.text for o in first] != [o.text for o in other_seed]


def test_shared_prefill_samples_equal_separate_prefills_and_encode_each_prompt_once(tiny):
    """Decoder "generate": n samples of a prompt reuse one prefill, the same samples, each prompt seen once."""
    model = tiny[0]
    rows_seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows_seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    settings = dataclasses.replace(SAMPLING, n=4)
    requests = make_requests(5)
    try:
        separate = generate_decoder(tiny, batch_size=20)
        separate.shared_prefill = False
        expected = separate.generate(requests, settings, stage="s")
        separate_prefill = rows_seen[0]
        rows_seen.clear()
        shared = generate_decoder(tiny, batch_size=20).generate(requests, settings, stage="s")
    finally:
        hook.remove()
    assert [(o.key, o.sample, o.text) for o in shared] == [(o.key, o.sample, o.text) for o in expected]
    width = max(len(ids) for ids in separate.tokenize([separate.render(r.messages) for r in requests]))
    assert separate_prefill == (20, width)  # generate() alone encodes every prompt 4 times
    assert rows_seen[0] == (5, width - 1)  # the shared prefill: each prompt once, all but its last token
    assert rows_seen[1] == (20, 1)  # generate() then feeds the last prompt token of every sample


# ---- the decoding loop ---------------------------------------------------------------------------
def ending_early(tiny) -> tuple:
    """A copy of the tiny model whose end token is one it writes often, so rows end at different steps."""
    model, tokenizer = tiny
    probe = engine(tiny)
    counts: dict[int, int] = {}
    for ids in probe.tokenize([probe.render(r.messages) for r in make_requests(16)]):
        written = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        for token in written.tolist()[1:]:  # not the first: some rows should run a while
            counts[token] = counts.get(token, 0) + 1
    ending = copy.deepcopy(model)
    ending.generation_config.eos_token_id = max(counts, key=counts.get)
    return ending, tokenizer


def test_loop_decoder_gives_the_greedy_texts_of_generate_while_ended_rows_leave_the_batch(tiny):
    ending = ending_early(tiny)
    requests = make_requests(16)
    expected = generate_decoder(ending, batch_size=16).generate(requests, GREEDY, stage="s")
    loop = engine(ending, batch_size=16)
    shapes, hook = forward_shapes(ending[0])
    try:
        outputs = loop.generate(requests, GREEDY, stage="s")
    finally:
        hook.remove()
    reasons = {o.finish_reason for o in expected}
    assert reasons == {"eos", "length"} and len({o.new_tokens for o in expected}) > 3  # rows end apart
    assert [(o.text, o.finish_reason, o.new_tokens) for o in outputs] == [
        (o.text, o.finish_reason, o.new_tokens) for o in expected
    ]
    decode_rows = [rows for rows, width in shapes if width == 1]
    assert decode_rows[0] == 16 and min(decode_rows) < 16  # ended rows were dropped from the cache
    assert decode_rows == sorted(decode_rows, reverse=True)
    assert len(decode_rows) == max(o.new_tokens for o in expected) - 1  # no step after the last row ended
    stats = loop.describe()["decode_stats"]
    assert stats["rows_dropped"] > 0 and stats["rows"] == 16
    # dropping nothing gives the same texts: pruning changes cost, not results
    keep_all = engine(ending, batch_size=16)
    keep_all.decode_options = dataclasses.replace(keep_all.decode_options, prune_share=2.0)
    assert keep_all.generate(requests, GREEDY, stage="s") == outputs


def test_rows_join_the_batch_as_others_end_with_the_same_outputs(tiny):
    """max_rows below the call's rows: waiting prompts are prefilled and joined as rows end; greedy
    texts and samples are those of decoding every row at once."""
    ending = ending_early(tiny)
    requests = make_requests(16)
    everything = engine(ending, batch_size=16).generate(requests, GREEDY, stage="s")
    windowed = engine(ending, batch_size=16)
    windowed.decode_options = dataclasses.replace(windowed.decode_options, max_rows=5)
    shapes, hook = forward_shapes(ending[0])
    try:
        outputs = windowed.generate(requests, GREEDY, stage="s")
    finally:
        hook.remove()
    assert outputs == everything
    assert max(rows for rows, width in shapes if width == 1) <= 5
    stats = windowed.describe()["decode_stats"]
    assert stats["rows_joined"] > 0 and stats["rows_dropped"] == 16
    sampled = engine(ending, batch_size=16)
    sampled.decode_options = dataclasses.replace(sampled.decode_options, max_rows=4)
    assert sampled.generate(requests, SAMPLING, stage="s") == engine(ending, batch_size=16).generate(
        requests, SAMPLING, stage="s"
    )


def test_shared_groups_pick_the_prefixes_that_save_most():
    a, b, c = [5] * 20, [6] * 30, [9] * 10
    ids = [a + [1], b + [1, 2], a + [2, 3], [7, 1], b + [3], a + [4]]
    assert shared_groups(ids, min_shared=16) == [(20, [0, 2, 5]), (30, [1, 4])]
    assert shared_groups(ids, min_shared=25) == [(30, [1, 4])]
    # all six share 10 tokens, each half 50: two groups of 50 save 200 tokens, one of 10 saves 50
    nested = [c + [1] * 40 + [k] for k in range(3)] + [c + [2] * 40 + [k] for k in range(3)]
    assert shared_groups(nested, min_shared=4) == [(50, [0, 1, 2]), (50, [3, 4, 5])]
    assert shared_groups([[1, 2], [1, 2]], 1) == [(1, [0, 1])]  # the last token is never in the prefix
    assert shared_groups([[1], [1]], 1) == [] and shared_groups([[1, 2]], 1) == []


def test_shared_prefix_is_prefilled_once_and_gives_the_same_texts(tiny):
    model, _tokenizer = tiny
    preamble = "Worked example: the answer is found step by step. " * 6
    requests = [
        GenerationRequest(r.key, [{"role": "system", "content": preamble}, *r.messages]) for r in make_requests(9)
    ]
    shapes, hook = forward_shapes(model)
    try:
        shared = one_rest_call(engine(tiny, batch_size=9)).generate(requests, GREEDY, stage="s")
        prefills_shared = [shape for shape in shapes if shape[1] > 1]
        shapes.clear()
        whole = one_rest_call(engine(tiny, batch_size=9))
        whole.decode_options = dataclasses.replace(whole.decode_options, min_shared_prefix=10**9)
        separate = whole.generate(requests, GREEDY, stage="s")
        prefills_whole = [shape for shape in shapes if shape[1] > 1]
    finally:
        hook.remove()
    prompt_tokens = sorted(o.prompt_tokens for o in shared)
    (one_row, rest), (all_rows,) = prefills_shared, prefills_whole
    assert one_row[0] == 1 and one_row[1] > 60  # the preamble and the template's opening, once
    assert rest == (9, prompt_tokens[-1] - one_row[1]) and all_rows == (9, prompt_tokens[-1])
    assert [o.text for o in shared] == [o.text for o in separate]
    plain = generate_decoder(tiny, batch_size=9).generate(requests, GREEDY, stage="s")
    assert [o.text for o in shared] == [o.text for o in plain]


def test_prompts_of_two_preambles_in_one_call_share_their_own_prefixes(tiny):
    """Two tasks' preambles of different lengths, and a prompt with neither, in one call: one prefill
    row per preamble (left-padded), then every prompt's rest; the texts of prefilling each whole."""
    model, _tokenizer = tiny
    preambles = ["Worked example: add the numbers. " * 3, "Read the passage, then choose an option. " * 6]
    requests = [
        GenerationRequest(
            r.key, [{"role": "system", "content": preambles[i % 2]}, *r.messages] if i < 8 else r.messages
        )
        for i, r in enumerate(make_requests(9))
    ]
    shapes, hook = forward_shapes(model)
    try:
        shared = one_rest_call(engine(tiny, batch_size=9))
        outputs = shared.generate(requests, GREEDY, stage="s")
    finally:
        hook.remove()
    whole = engine(tiny, batch_size=9)
    whole.decode_options = dataclasses.replace(whole.decode_options, min_shared_prefix=10**9)
    assert [o.text for o in outputs] == [o.text for o in whole.generate(requests, GREEDY, stage="s")]
    prefixes, rest = (shape for shape in shapes if shape[1] > 1)
    assert prefixes[0] == 2 and rest[0] == 9
    stats = shared.describe()["decode_stats"]
    assert stats["shared_groups"] == 2 and stats["prefix_tokens_saved"] > 3 * prefixes[1]


def test_prefill_segments_cut_where_padding_costs_more_than_a_call():
    lengths = [5, 100, 6, 98, 7]
    assert prefill_segments(lengths, call_tokens=10) == [[0, 2, 4], [3, 1]]  # 2 + 4 padded tokens, 2 calls
    assert prefill_segments(lengths, call_tokens=10**6) == [[0, 2, 4, 3, 1]]  # one call, sorted by length
    assert prefill_segments(lengths, call_tokens=0) == [[0], [2], [4], [3], [1]]  # no padding at all
    assert prefill_segments([4, 4, 4], call_tokens=0) == [[0, 1, 2]]  # equal lengths stay in one call
    assert prefill_segments([], call_tokens=5) == []


def test_rests_prefilled_in_calls_of_similar_lengths_give_the_same_outputs_with_less_padding(tiny):
    """Prompts sharing a preamble, with rests of very different lengths: cut into several prefill calls
    (stacked into one cache afterwards), the greedy texts and the samples of one padded call, also when
    waiting prompts join the batch; fewer prompt tokens are fed."""
    ending = ending_early(tiny)
    preamble = "Worked example: the answer is found step by step. " * 4
    requests = [
        GenerationRequest(
            f"q{i:02d}",
            [{"role": "system", "content": preamble}, {"role": "user", "content": f"{i} " + "word " * (i % 4) * 9}],
        )
        for i in range(10)
    ]

    def made(call_tokens, **options):
        made = engine(ending, batch_size=10)
        made.decode_options = dataclasses.replace(made.decode_options, prefill_call_tokens=call_tokens, **options)
        return made

    for settings in (GREEDY, SAMPLING):
        for window in (None, 4):
            cut, whole = made(0, max_rows=window), made(10**9, max_rows=window)
            outputs = cut.generate(requests, settings, stage="s")
            assert outputs == whole.generate(requests, settings, stage="s")
            if window is not None:  # prompts join a few at a time, in the plan's order of length
                continue
            calls, tokens = cut.decode_stats["prefill_calls"], cut.decode_stats["prefill_tokens"]
            assert calls > whole.decode_stats["prefill_calls"] and tokens < whole.decode_stats["prefill_tokens"]
            if settings.n == 1:  # one call's rests are padded; cut by length, none are
                assert cut.decode_stats["prefill_padding"] == 0 < whole.decode_stats["prefill_padding"]
                assert cut.decode_stats["shared_groups"] == 1 and calls == 1 + 4  # the preamble, 4 rest lengths
    greedy = made(0).generate(requests, GREEDY, stage="s")
    assert [o.text for o in greedy] == [
        o.text for o in generate_decoder(ending, batch_size=10).generate(requests, GREEDY, stage="s")
    ]


def test_a_model_with_sliding_window_layers_prefills_in_one_call_and_never_joins(tiny):
    """Sliding-window cache layers count padding in their window: their prompts are prefilled whole
    (no shared prefix, which would put padding inside a row) in one call, and waiting prompts do not
    join running rows (joining pads rows); the texts are generate()'s."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**tiny[0].config.to_dict(), "sliding_window": 8, "model_type": "mistral"})
    torch.manual_seed(0)
    sliding = (MistralForCausalLM(config).eval(), tiny[1])
    preamble = "Worked example: the answer is found step by step. " * 3  # a prefix worth sharing
    requests = [
        GenerationRequest(r.key, [{"role": "system", "content": preamble}, *r.messages]) for r in make_requests(8)
    ]
    made = engine(sliding, batch_size=8)
    made.decode_options = dataclasses.replace(made.decode_options, prefill_call_tokens=0, max_rows=3)
    outputs = made.generate(requests, GREEDY, stage="s")
    stats = made.decode_stats
    assert stats["calls"] == stats["prefill_calls"] == 1 and stats["shared_groups"] == stats["rows_joined"] == 0
    expected = generate_decoder(sliding, batch_size=8).generate(requests, GREEDY, stage="s")
    assert [o.text for o in outputs] == [o.text for o in expected]


def test_a_sample_does_not_depend_on_the_rows_beside_it(tiny):
    """Each row samples from its own generator, seeded by (seed, stage, key, sample): batch size,
    the other prompts and when their rows end change nothing."""
    requests = make_requests(7)
    together = engine(tiny, batch_size=14).generate(requests, SAMPLING, stage="s")
    alone = [o for r in requests for o in engine(tiny, batch_size=2).generate([r], SAMPLING, stage="s")]
    assert [(o.key, o.sample, o.text) for o in together] == [(o.key, o.sample, o.text) for o in alone]
    other_stage = engine(tiny, batch_size=14).generate(requests, SAMPLING, stage="t")
    assert [o.text for o in other_stage] != [o.text for o in together]


def test_a_generation_config_only_generate_applies_keeps_generate_and_says_so(tiny):
    model, tokenizer = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.3
    made = TransformersEngine(penalised, tokenizer, progress=False)
    assert made.decoder == "generate" and made.decoder_name() == "generate"
    assert made.describe()["events"] == [{"event": "decoder_generate", "because": ["repetition_penalty=1.3"]}]
    penalised.generation_config.repetition_penalty = 1.0  # neutral: nothing for the loop to miss
    assert TransformersEngine(penalised, tokenizer, progress=False).decoder == "loop"


def test_a_store_is_not_resumed_by_another_decoder(tiny, tmp_path):
    requests = make_requests(4)
    generate_decoder(tiny, batch_size=2).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    with pytest.raises(StoreMismatchError, match="decoder"):
        engine(tiny, batch_size=2).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["decoder"] == "generate"


def test_memory_budget_cuts_calls_by_the_batch_lengths(tiny):
    from reflectevo.generation.base import MemoryBudget

    eng = engine(tiny, batch_size=64)
    settings = dataclasses.replace(SAMPLING, n=2, max_new_tokens=100)
    assert eng.rows_that_fit(300, settings) >= 64  # no budget (CPU): the planned batch runs whole
    # 1 MB budget; a 300-token prompt with 100 new tokens: 400 x 1000 B of KV + 300 x 500 / 2 B of
    # activations + 1000 B of logits = 476 kB per sample, 952 kB per prompt with its 2 samples
    eng.memory_budget = MemoryBudget(1_000_000, kv_per_token=1000, activations_per_token=500, per_row=1000)
    assert eng.rows_that_fit(300, settings) == 1
    assert eng.rows_that_fit(100, settings) == 2  # 200 kB + 25 kB + 1 kB = 226 kB per sample
    assert eng.rows_that_fit(10_000, settings) == 1  # never below one prompt: the OOM back-off takes over


# ---- out-of-memory back-off --------------------------------------------------------------------
def oom_above(tiny, limit: int):
    """The same model, but its forward pass raises CUDA's out-of-memory error above ``limit`` rows."""
    from transformers import LlamaForCausalLM

    class OutOfMemoryAbove(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            if input_ids is not None and input_ids.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (more than {limit} rows)")
            return super().forward(input_ids=input_ids, **kwargs)

    model = OutOfMemoryAbove(tiny[0].config).eval()
    model.load_state_dict(tiny[0].state_dict())
    return model


def test_out_of_memory_halves_the_batch_and_records_it(tiny, tmp_path):
    requests = make_requests(10)
    reference = engine(tiny, batch_size=8).generate(requests, GREEDY, stage="s")
    backing_off = TransformersEngine(oom_above(tiny, 2), tiny[1], batch_size=8, progress=False)
    outputs = backing_off.generate(requests, GREEDY, stage="first", store_dir=tmp_path / "store")
    assert [o.text for o in outputs] == [o.text for o in reference]  # greedy: same texts in smaller batches
    assert backing_off.events == [
        {"event": "oom_backoff", "stage": "first", "batch": 0, "old_size": 8, "new_size": 4},
        {"event": "oom_backoff", "stage": "first", "batch": 0, "old_size": 4, "new_size": 2},
    ]  # the second plan batch starts at the size that fitted
    assert backing_off.describe()["events"] == backing_off.events
    with pytest.raises(torch.cuda.OutOfMemoryError):
        TransformersEngine(oom_above(tiny, 0), tiny[1], batch_size=4, progress=False).generate(
            requests, GREEDY, stage="s"
        )


# ---- store: resume, damage, mismatch ------------------------------------------------------------
CHILD = """
import json, sys, time
from transformers import AutoTokenizer, LlamaForCausalLM
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.generation.engines import TransformersEngine

class SlowEngine(TransformersEngine):  # slow enough that the parent can kill it between batches
    def run_batch(self, *args, **kwargs):
        time.sleep(0.4)
        return super().run_batch(*args, **kwargs)

model_dir, job = sys.argv[1], json.loads(open(sys.argv[2]).read())
engine = SlowEngine(LlamaForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir),
                    batch_size=job["batch_size"], progress=False)
requests = [GenerationRequest(r["key"], r["messages"]) for r in job["requests"]]
engine.generate(requests, GenerationSettings(**job["settings"]), stage="reflect", store_dir=job["store"])
"""


def test_killed_run_resumes_to_the_same_bytes(tiny, tiny_dir, tmp_path):
    requests = make_requests(16)
    store = tmp_path / "killed"
    job = {
        "batch_size": 4,
        "settings": SAMPLING.to_dict(),
        "store": str(store),
        "requests": [{"key": r.key, "messages": r.messages} for r in requests],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "child.py").write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tiny_dir), str(tmp_path / "job.json")],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(store.glob("batch-*.jsonl")):
        assert child.poll() is None, f"the child ended before committing a batch:\n{child.stderr.read()}"
        assert time.monotonic() < deadline, "no batch was committed within 120 s"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    committed = sorted(p.name for p in store.glob("batch-*.jsonl"))
    assert 1 <= len(committed) < 8  # 16 prompts x 2 samples in batches of 4 sequences: 8 batches
    stray = store / f".batch-00007{committed[0][len('batch-00000') :]}.half.tmp"  # a writer killed mid-write
    stray.write_text('{"key": "q000", "text": "not a result"')

    resumed_engine = engine(tiny, batch_size=4)
    resumed = resumed_engine.generate(requests, SAMPLING, stage="reflect", store_dir=store)
    uninterrupted = engine(tiny, batch_size=4).generate(
        requests, SAMPLING, stage="reflect", store_dir=tmp_path / "whole"
    )
    assert resumed_engine.stats["reflect"]["batches_resumed"] == len(committed)
    assert not stray.exists()
    assert as_bytes(resumed, tmp_path / "a.jsonl") == as_bytes(uninterrupted, tmp_path / "b.jsonl")
    for path in sorted((tmp_path / "whole").glob("batch-*.jsonl")):
        assert (store / path.name).read_bytes() == path.read_bytes()


def test_damaged_batch_file_is_generated_again(tiny, tmp_path):
    requests = make_requests(6)
    first = engine(tiny, batch_size=2).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    damaged = next(tmp_path.glob("batch-00001-*.jsonl"))
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[:-10])  # cut inside the last line
    rerun = engine(tiny, batch_size=2)
    assert rerun.generate(requests, GREEDY, stage="s", store_dir=tmp_path) == first
    assert damaged.read_bytes() == intact and rerun.stats["s"]["batches_run"] == 1


def test_store_of_another_plan_is_an_error_unless_forced(tiny, tmp_path):
    requests = make_requests(6)
    engine(tiny, batch_size=2).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    with pytest.raises(StoreMismatchError, match=r"settings.*new run name.*--force"):
        engine(tiny, batch_size=2).generate(
            requests, GenerationSettings(max_new_tokens=5), stage="s", store_dir=tmp_path
        )
    renamed = make_requests(5) + [GenerationRequest("other", requests[5].messages)]
    with pytest.raises(StoreMismatchError, match="record keys or prompts"):
        engine(tiny, batch_size=2).generate(renamed, GREEDY, stage="s", store_dir=tmp_path)
    with pytest.raises(StoreMismatchError, match="batch size"):
        engine(tiny, batch_size=3).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    (tmp_path / "plan.json").unlink()  # batch files alone still have to match the plan's keys
    with pytest.raises(StoreMismatchError, match="do not belong to this plan"):
        engine(tiny, batch_size=3).generate(requests, GREEDY, stage="s", store_dir=tmp_path)
    short = GenerationSettings(max_new_tokens=5)
    forced = engine(tiny, batch_size=3).generate(requests, short, stage="s", store_dir=tmp_path, force=True)
    assert forced == engine(tiny, batch_size=3).generate(requests, short, stage="s")
    assert load_store(tmp_path) != [] and all(o.settings["max_new_tokens"] == 5 for o in load_store(tmp_path))


# ---- shards ------------------------------------------------------------------------------------
def test_two_shards_merged_equal_one_run(tiny, tmp_path):
    requests = make_requests(11)
    single = engine(tiny, batch_size=4).generate(requests, SAMPLING, stage="s")
    parts = [
        engine(tiny, batch_size=4, num_shards=2, shard_index=k).generate(
            requests, SAMPLING, stage="s", store_dir=tmp_path
        )
        for k in (0, 1)
    ]
    assert {o.batch % 2 for o in parts[0]} == {0} and {o.batch % 2 for o in parts[1]} == {1}
    merged = merge_shards(parts, requests)
    assert as_bytes(merged, tmp_path / "merged.jsonl") == as_bytes(single, tmp_path / "single.jsonl")
    assert merge_shards([load_store(tmp_path)], requests) == single  # both shards wrote into one folder
    with pytest.raises(GenerationError, match="in no shard"):
        merge_shards(parts[:1], requests)
    with pytest.raises(GenerationError, match="explicit batch_size"):
        engine(tiny, batch_size="auto", num_shards=2)


def test_auto_batch_size_on_cpu_is_fixed_and_recorded(tiny):
    auto = engine(tiny, batch_size="auto")
    assert auto.batch_size == 16 and auto.events == [
        {"event": "batch_size_auto", "batch_size": 16, "how": "CPU default"}
    ]


# ---- replay and the factory ----------------------------------------------------------------------
def test_replay_serves_stored_outputs_by_key(tiny, tmp_path):
    requests = make_requests(4)
    stored = engine(tiny, batch_size=2).generate(requests, SAMPLING, stage="s", store_dir=tmp_path / "store")
    write_outputs(tmp_path / "out.jsonl", stored)
    assert read_outputs(tmp_path / "out.jsonl") == stored
    shuffled = list(reversed(requests))
    from_file = ReplayEngine.from_path(tmp_path / "out.jsonl").generate(shuffled, SAMPLING, stage="s")
    assert from_file == sorted(stored, key=lambda o: (-int(o.key[1:]), o.sample))
    assert ReplayEngine.from_path(tmp_path / "store").generate(requests, SAMPLING, stage="s") == stored
    replay = make_engine(GenerationParams(engine="replay", replay_from=str(tmp_path / "out.jsonl")))
    with pytest.raises(ReplayMissingError, match="'q004' sample 0 \\(12 missing"):
        replay.generate(make_requests(10), SAMPLING, stage="s")


def test_replay_of_scripted_rows_fills_in_the_rest():
    scripted = ReplayEngine(
        [
            {"key": "a", "text": "Thought: x\nAction: Finish[B]"},
            {"key": "b", "text": "Action: Finish[C]", "finish_reason": "length"},
        ]
    )
    a, b = scripted.generate([GenerationRequest("a", []), GenerationRequest("b", [])], GREEDY, stage="first")
    assert (a.text, a.finish_reason, a.engine, a.stage, a.settings) == (
        "Thought: x\nAction: Finish[B]",
        "eos",
        "replay",
        "first",
        GREEDY.to_dict(),
    )
    assert b.finish_reason == "length"
    with pytest.raises(DuplicateKeyError, match="'a' sample 0"):
        ReplayEngine([{"key": "a", "text": "1"}, {"key": "a", "text": "2"}])


def test_make_engine_needs_a_model_for_model_engines():
    with pytest.raises(GenerationError, match="needs a loaded model"):
        make_engine(GenerationParams())


def test_make_engine_follows_the_loaded_backend(tiny_dir, tiny):
    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name=str(tiny_dir), device="cpu"))
    auto = make_engine(GenerationParams(batch_size=4), loaded, progress=False)
    assert isinstance(auto, TransformersEngine) and auto.describe()["model"] == str(tiny_dir)
    assert auto.max_seq_length == 512  # the model's positions bound the params' 2048
    requests = make_requests(5)
    assert [o.text for o in auto.generate(requests, GREEDY, stage="s")] == [
        o.text for o in engine(tiny).generate(requests, GREEDY, stage="s")
    ]
    with pytest.raises(GenerationError, match="loaded through Unsloth"):
        make_engine(GenerationParams(engine="unsloth"), loaded)


def test_vllm_engine_contract(tiny_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from reflectevo.generation.engines import VLLMEngine

    vllm_engine = VLLMEngine(str(tiny_dir), batch_size=4, progress=False, gpu_memory_utilization=0.3)
    requests = make_requests(5)
    outputs = vllm_engine.generate(requests, SAMPLING, stage="s")
    assert [(o.key, o.sample) for o in outputs] == [(r.key, s) for r in requests for s in (0, 1)]
    assert all(o.finish_reason in ("eos", "stop", "length") and o.new_tokens <= 12 for o in outputs)
    assert vllm_engine.generate(requests, SAMPLING, stage="s") == outputs  # per-request seeds


# ---- grouped attention in the loop decoder's steps ----------------------------------------------
def grouped_heads_model(tiny, kv_heads: int = 2):
    """The test model's shape with its query heads sharing ``kv_heads`` key/value heads, random weights."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny[0].config)
    config.num_key_value_heads = kv_heads
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def counting_repeat_kv(monkeypatch) -> list[int]:
    """Count transformers' copies of key/value heads per query head (repeat_kv with n_rep > 1)."""
    import transformers.integrations.sdpa_attention as sdpa

    calls, original = [], sdpa.repeat_kv

    def counted(hidden, n_rep):
        if n_rep > 1:
            calls.append(hidden.shape[2])
        return original(hidden, n_rep)

    monkeypatch.setattr(sdpa, "repeat_kv", counted)
    return calls


def test_grouped_attention_gives_the_logits_of_sdpa_without_copying_key_value_heads(tiny, monkeypatch):
    from reflectevo.generation.attention import grouped_attention, groups_of

    heads = tiny[0].config.num_attention_heads
    model = grouped_heads_model(tiny, kv_heads=1)  # every query head on one key/value head
    ungrouped = grouped_heads_model(tiny, kv_heads=heads)
    assert groups_of(model) == heads > 1 and groups_of(ungrouped) == 1
    copies = counting_repeat_kv(monkeypatch)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :9] = 0, 0  # left padding of different widths
    with torch.inference_mode():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)

    def decode(grouped: bool) -> list[torch.Tensor]:
        cache, step_mask, token = copy.deepcopy(prefill.past_key_values), mask, prefill.logits[:, -1].argmax(-1)
        steps = []
        with grouped_attention(model) if grouped else contextlib.nullcontext(), torch.inference_mode():
            for _ in range(4):
                step_mask = torch.cat([step_mask, step_mask.new_ones(3, 1)], dim=1)
                logits = model(input_ids=token[:, None], attention_mask=step_mask, past_key_values=cache).logits[:, -1]
                steps.append(logits)
                token = logits.argmax(-1)
        return steps

    copies.clear()
    plain = decode(grouped=False)
    assert len(copies) == 4 * 2 * model.config.num_hidden_layers  # keys and values, every layer, every step
    copies.clear()
    grouped = decode(grouped=True)
    assert copies == []  # no step copied a key/value head
    assert model.config._attn_implementation == "sdpa"  # restored after the block
    for a, b in zip(plain, grouped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with grouped_attention(ungrouped) as switched:  # no grouped heads: left as it is
        assert not switched


def test_the_loop_decoder_attends_grouped_and_its_stores_say_so(tiny, monkeypatch, tmp_path):
    model = grouped_heads_model(tiny)
    copies = counting_repeat_kv(monkeypatch)
    per_forward = 2 * model.config.num_hidden_layers  # keys and values of every layer
    requests = make_requests(6)
    runs = {}
    for grouped in (True, False):  # False: the benchmarks' baseline, transformers' SDPA in every step
        made = engine((model, tiny[1]), batch_size=6)
        made.grouped_attention = grouped
        copies.clear()
        shapes, hook = forward_shapes(model)
        try:
            made.generate(requests, GREEDY, stage="s", store_dir=tmp_path / str(grouped))
        finally:
            hook.remove()
        prefills = sum(width > 1 for _, width in shapes)
        runs[grouped] = (made.decoder_name(), len(copies), prefills, len(shapes))
    assert runs[True][0] == DECODER_VERSION and runs[False][0] == f"{DECODER_VERSION}-repeat-kv"
    assert runs[True][1] == per_forward * runs[True][2]  # only the prefills copied heads
    assert runs[False][1] == per_forward * runs[False][3] > runs[True][1]  # every forward did
    assert json.loads((tmp_path / "True" / "plan.json").read_text())["decoder"] == DECODER_VERSION
    plain = engine((model, tiny[1]), batch_size=6)
    plain.grouped_attention = False
    with pytest.raises(StoreMismatchError, match="decoder"):  # the two are not mixed in one store
        plain.generate(requests, GREEDY, stage="s", store_dir=tmp_path / "True")


def test_a_reserved_layer_writes_in_place_until_its_room_runs_out_or_its_rows_change():
    from reflectevo.generation.cache import reserved_layer_class

    layer = reserved_layer_class()(reserve=3)
    states = [torch.randn(2, 2, width, 4, generator=torch.Generator().manual_seed(width)) for width in (5, 1, 1, 1, 1)]
    buffers = []
    for new in states:
        keys, values = layer.update(new, -new)
        buffers.append(layer.key_buffer.data_ptr())
    expected = torch.cat(states, dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    # the prompt's 5 positions + 3 of room: three steps in place, the fourth finds no room
    assert buffers[0] == buffers[1] == buffers[2] == buffers[3] != buffers[4]
    layer.crop(-2)  # a view of the same buffer: the next update overwrites the cropped positions
    ptr = layer.key_buffer.data_ptr()
    keys, _ = layer.update(states[1], -states[1])
    assert layer.key_buffer.data_ptr() == ptr and torch.equal(keys, torch.cat([expected[:, :, :7], states[1]], dim=-2))
    layer.batch_select_indices(torch.tensor([1]))  # rows changed: the next update copies once, then room again
    assert layer.key_buffer is None and layer.value_buffer is None  # the old buffers are not kept alive
    keys, _ = layer.update(states[2][1:], -states[2][1:])
    assert layer.key_buffer.data_ptr() != ptr and keys.shape == (1, 2, 9, 4)
    assert torch.equal(keys, torch.cat([expected[1:, :, :7], states[1][1:], states[2][1:]], dim=-2))


def test_stack_rows_left_pads_with_zeros_repeats_rows_and_keeps_room(tiny):
    from transformers import DynamicCache

    from reflectevo.generation.cache import reserve_room, reserved_layer_class, stack_rows

    config = tiny[0].config
    parts, masks = [], []
    for rows, width in ((2, 3), (1, 5)):
        cache = DynamicCache(config=config)
        for number, layer in enumerate(cache.layers):
            keys = torch.randn(rows, 2, width, 4, generator=torch.Generator().manual_seed(number * 10 + width))
            layer.update(keys, -keys)
        parts.append(cache)
        masks.append(torch.ones(rows, width, dtype=torch.long))
    target = reserve_room(DynamicCache(config=config), reserve=4)
    mask = stack_rows(target, parts, masks, repeats=2)
    assert mask.tolist() == [[0, 0, 1, 1, 1]] * 4 + [[1] * 5] * 2
    for layer, first, second in zip(target.layers, parts[0].layers, parts[1].layers, strict=True):
        assert isinstance(layer, reserved_layer_class()) and layer.key_buffer.shape == (6, 2, 5 + 4, 4)
        expected = torch.cat([F.pad(first.keys, (0, 0, 2, 0)).repeat_interleave(2, 0), second.keys.repeat(2, 1, 1, 1)])
        assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
        assert layer.has_room(6, torch.zeros(6, 2, 1, 4))  # the next step writes in place


def test_the_reserved_cache_gives_the_outputs_of_the_concatenating_one_without_copying_per_step(tiny, monkeypatch):
    """The reserved cache (room kept for the call's tokens, since decoder loop-3) against the former cache: the same greedy
    texts and samples with rows ending, joining and sharing prefixes, and a call that drops no rows
    allocates each layer's buffers once, however many steps it decodes."""
    from reflectevo.generation.cache import reserved_layer_class

    ending = ending_early(tiny)
    requests = make_requests(12)

    def made(**options):
        made = engine(ending, batch_size=12)
        made.decode_options = dataclasses.replace(made.decode_options, **options)
        return made

    for settings in (GREEDY, SAMPLING):
        for window in (None, 5):
            reserved = made(max_rows=window).generate(requests, settings, stage="s")
            concatenated = made(max_rows=window, reserve_cache=False).generate(requests, settings, stage="s")
            assert reserved == concatenated
    assert made().decoder_name() == DECODER_VERSION
    assert made(reserve_cache=False).decoder_name() == f"{DECODER_VERSION}-concat-cache"

    grown = []
    original = reserved_layer_class().grown
    monkeypatch.setattr(reserved_layer_class(), "grown", lambda self, *a: grown.append(a[-1]) or original(self, *a))
    for call_tokens in (10**9, 0):  # the rests prefilled in one call, or in calls stacked afterwards
        # no rows dropped, no shared prefix
        steady = made(prune_share=2.0, min_shared_prefix=10**6, prefill_call_tokens=call_tokens)
        shapes, hook = forward_shapes(ending[0])
        grown.clear()
        try:
            steady.generate(requests, GREEDY, stage="s")
        finally:
            hook.remove()
        steps = sum(width == 1 for _rows, width in shapes)
        assert steps >= 8 and steady.decode_stats["prefill_calls"] == len(shapes) - steps
        if call_tokens:  # keys and values of each layer, once, at prefill
            assert steady.decode_stats["prefill_calls"] == 1
            assert len(grown) == 2 * ending[0].config.num_hidden_layers
        else:  # stacking the calls' caches reserved the room: no step copied the cache
            assert steady.decode_stats["prefill_calls"] > 1 and grown == []
