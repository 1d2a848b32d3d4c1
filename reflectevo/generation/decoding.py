"""The transformers engine's decoding loop: shared prefixes prefilled once, ended rows leave the batch.

``model.generate`` computes every row of a padded batch until its slowest row stops and encodes every
prompt whole. This loop drives the model's own forward and ``DynamicCache`` instead:

1. prompts that share a prefix (a task's few-shot preamble, the chat template's system message) are
   grouped (:func:`shared_groups`); each group's prefix is prefilled once, on one row, and its cache
   row copied to every member; each prompt's remaining tokens are then prefilled after it, so a
   cache row holds ``padding | prefix | padding | rest`` with the padding masked out. The rests are
   prefilled in calls of similar lengths (:func:`prefill_segments`): one call pads every rest to the
   longest, and on the official mix a padded token costs as much as a real one;
2. the n samples of a prompt share that prefill (its cache rows are repeated n times);
3. decoding feeds one token per running row per step. A row that ends (end token, stop string,
   token limit) is no longer fed; once enough rows have ended the cache drops them
   (``batch_select_indices``), and with ``max_rows`` below the call's rows, waiting prompts are
   prefilled and joined to the running batch in the freed places, so a step keeps computing many
   rows (on a CPU a step's cost is mostly reading the weights, whatever the number of rows).
4. the cache keeps room for the call's tokens (:mod:`reflectevo.generation.cache`), so a step writes
   its position in place instead of copying the whole cache to append it; on models with grouped
   key/value heads a step attends without copying heads (:mod:`reflectevo.generation.attention`).

Sampling draws each row's tokens with its own ``torch.Generator`` (on the CPU, one uniform number per
token, inverted through the row's cumulative distribution on the model's device), seeded from the run
seed, the stage, the record key and the sample index: a row's sample does not depend on which rows
share its batch or when they end, so outputs are the same under any batch size, memory cut, shard or
resume.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reflectevo.generation.cache import reserve_room, reserved_layer_class, stack_rows
from reflectevo.generation.requests import GenerationSettings

if TYPE_CHECKING:
    import torch

# recorded in every plan: outputs of another decoder are not mixed into a store. loop-2: decoding steps
# attend with reflectevo.generation.attention.grouped_sdpa on models with grouped key/value heads;
# loop-3: the cache keeps room for the call's tokens (reflectevo.generation.cache), no copy per step;
# loop-4: prompts' rests are prefilled in calls of similar lengths (prefill_segments), less padding
DECODER_VERSION = "loop-4"


# what Decoder.prefill reports of each call in Decoder.last, summed over a run's prefills
PREFILL_STAT_KEYS = ("shared_groups", "prefix_tokens_saved", "prefill_calls", "prefill_tokens", "prefill_padding")


@dataclass(frozen=True)
class DecodeOptions:
    # a shorter common prefix is not worth a separate forward call (the chat template's first few
    # tokens are shared by every prompt; a few-shot preamble is hundreds)
    min_shared_prefix: int = 16
    # ended rows are dropped from the cache once they are this share of its rows: dropping copies
    # the whole cache (as one step's cache growth does), so it waits until it saves more than it costs
    prune_share: float = 0.125
    # rows decoded at once (None: all rows of the call). Below the call's rows, waiting prompts join
    # the batch as rows end, once this share of max_rows is free (joining also copies the cache)
    max_rows: int | None = None
    refill_share: float = 0.25
    # the cache reserves room for the call's max_new_tokens and a step writes its position in place
    # (reflectevo.generation.cache); False: transformers' DynamicLayer, which copies the cache each step
    reserve_cache: bool = True
    # what one more prefill call costs, in prompt tokens: the rests after a shared prefix are cut into
    # calls of similar lengths where the padding saved exceeds this (prefill_segments). None: 64 on a
    # CPU (a forward call of SmolLM2-135M costs ~0.1 s beyond its tokens, ~70 tokens' worth on 2
    # cores), 512 on a GPU (a setting, not a measurement: there a call's fixed cost is its kernel launches)
    prefill_call_tokens: int | None = None


# generation-config settings model.generate would apply and this loop does not, with their neutral
# values: a model whose generation config sets one is decoded by generate (the engine records it)
GENERATE_ONLY_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None, 0.0),
    "top_h": (None,),
    "num_beams": (None, 1),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


def generate_only_settings(generation_config: Any) -> list[str]:
    """The settings of ``generation_config`` that only model.generate applies (see above)."""
    return [
        f"{name}={getattr(generation_config, name)!r}"
        for name, neutral in GENERATE_ONLY_SETTINGS.items()
        if getattr(generation_config, name, None) not in neutral
    ]


@dataclass
class DecodedRow:
    new_ids: list[int]  # generated tokens, the end token included when one ended the row
    ended: bool  # by an end token or a stop string; False: the token limit


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence starts with."""
    first = token_ids[0]
    length = min(len(ids) for ids in token_ids)
    for ids in token_ids[1:]:
        same = 0
        while same < length and ids[same] == first[same]:
            same += 1
        length = same
    return length


def shared_groups(token_ids: Sequence[Sequence[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Groups of prompts that share a prefix worth prefilling once: ``(prefix length, member indices)``.

    In lexicographic order, prompts sharing a prefix sit side by side, and the prefix a run of them
    shares is the smallest common prefix of neighbours within it. Dynamic programming over where to
    cut that order maximises the prompt tokens saved, (members - 1) x prefix length summed over
    groups; a run sharing fewer than ``min_shared`` tokens saves nothing (its prompts are prefilled
    whole). Every prompt keeps at least its last token out of the prefix, to be fed with the rest.
    """
    count = len(token_ids)
    if count < 2 or min(len(ids) for ids in token_ids) < 2:
        return []
    order = sorted(range(count), key=lambda i: (list(token_ids[i]), i))
    neighbours = [common_prefix_length([token_ids[a], token_ids[b]]) for a, b in zip(order, order[1:])]

    best = [0] * (count + 1)  # best[j]: most tokens saved by grouping order[:j]
    cut: list[tuple[int, int]] = [(0, 0)] * (count + 1)  # (start of the last run, its prefix or 0)
    for j in range(1, count + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)  # order[j - 1] alone
        common, shortest = 1 << 62, len(token_ids[order[j - 1]])
        for i in range(j - 2, -1, -1):  # the run order[i:j]: its shared prefix only shrinks as i falls
            common, shortest = min(common, neighbours[i]), min(shortest, len(token_ids[order[i]]))
            length = min(common, shortest - 1)
            if length < min_shared:
                break  # a longer run shares no more
            if best[i] + (j - i - 1) * length > best[j]:
                best[j], cut[j] = best[i] + (j - i - 1) * length, (i, length)
    groups = []
    j = count
    while j > 0:
        i, length = cut[j]
        if length:
            groups.append((length, sorted(order[i:j])))
        j = i
    return sorted(groups, key=lambda group: group[1][0])


def prefill_segments(lengths: Sequence[int], call_tokens: int) -> list[list[int]]:
    """Prompts (by index) cut into prefill calls: sorted by ``lengths``, each call padded to its longest.

    Cutting the sorted order into runs, a run costs ``call_tokens`` plus its rows x its longest length;
    dynamic programming over the cuts gives the cheapest set of calls (one call when padding is cheaper
    than another call). Ties keep fewer, earlier cuts, so the same lengths always give the same calls.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0] + [1 << 62] * len(order)  # best[j]: cheapest cost of prefilling order[:j]
    start = [0] * (len(order) + 1)  # where the last call of that cheapest way begins
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + call_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], start[j] = cost, i
    segments = []
    j = len(order)
    while j > 0:
        segments.append(order[start[j] : j])
        j = start[j]
    return segments[::-1]


def left_padded(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded to ``width`` and their attention mask."""
    import torch

    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, as generate() derives them from the mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    import torch  # here and below: the package imports without torch; only generating needs it

    generators = []
    for seed in seeds:
        generator = torch.Generator()
        generator.manual_seed(seed % 2**63)
        generators.append(generator)
    return generators


def warp(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in the order and with the tie rules of transformers' warpers."""
    import torch

    scores = scores / settings.temperature
    lowest = torch.finfo(scores.dtype).min
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1])).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, lowest)
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - settings.top_p)
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), lowest)
    return scores


class Decoder:
    """One call's prompts in, each row's generated tokens out (prompt-major, n samples per prompt)."""

    def __init__(
        self, model: Any, tokenizer: Any, eos_ids: set[int], pad_id: int, options: DecodeOptions | None = None
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids, self.pad_id = sorted(eos_ids), pad_id
        self.options = options or DecodeOptions()
        self.last: dict[str, int] = {}  # what the last call did: shared prefix, steps, rows dropped

    def cache(self, reserve: int = 0) -> Any:
        """An empty cache; with ``options.reserve_cache``, one keeping room for ``reserve`` more positions."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        return reserve_room(cache, reserve) if self.options.reserve_cache else cache

    def prefill(
        self, token_ids: Sequence[Sequence[int]], n: int, reserve: int = 0
    ) -> tuple[list[int], Any, torch.Tensor, torch.Tensor]:
        """The cache of every prompt, each repeated ``n`` times, with its attention mask and the last
        position's logits; first, the prompts in the order of the cache's rows. Each shared prefix
        (:func:`shared_groups`) runs once, on one row; the rests after it run in calls of similar
        lengths (:func:`prefill_segments`). The cache keeps room for ``reserve`` generated positions
        (see :meth:`cache`)."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        # a sliding window counts cache positions, padding included: padding between a shared prefix and
        # a rest would shift what a row sees, so such caches prefill each prompt whole, as generate() does
        groups = shared_groups(token_ids, self.options.min_shared_prefix) if self.stackable else []
        # the prefix each prompt's cache row starts with: its group's, or none (its row is then a copy
        # of some group's, masked out entirely: finite values, never attended to)
        prefix_of = [0] * len(token_ids)
        row_of = [0] * len(token_ids)
        prefix_width = max((length for length, _members in groups), default=0)
        prefixes = self.cache(reserve)  # with one prefill call, it goes on to hold every prompt
        if groups:
            for row, (length, members) in enumerate(groups):
                for member in members:
                    prefix_of[member], row_of[member] = length, row
            prefix_ids = [list(token_ids[members[0]][:length]) for length, members in groups]
            input_ids, prefix_mask = left_padded(prefix_ids, prefix_width, self.pad_id)
            self.model(
                input_ids=input_ids.to(device),
                attention_mask=prefix_mask.to(device),
                position_ids=positions_of(prefix_mask).to(device),
                past_key_values=prefixes,
                use_cache=True,
                logits_to_keep=1,
            )
            prefix_mask = prefix_mask[row_of]
            prefix_mask[[i for i, length in enumerate(prefix_of) if not length]] = 0
        suffixes = [list(ids[length:]) for ids, length in zip(token_ids, prefix_of, strict=True)]
        if self.stackable:
            segments = prefill_segments([len(ids) for ids in suffixes], self.call_tokens())
        else:  # layers stack_rows cannot pad and stack (sliding windows): one call
            segments = [list(range(len(token_ids)))]
        caches, masks, logits, widths = [], [], [], []
        for segment in segments:
            # one call: the prefixes' cache itself; several: plain layers, stacked afterwards into one
            # cache with room (stack_rows). Either starts from the prefix rows of the segment's prompts
            cache = prefixes if len(segments) == 1 else DynamicCache(config=self.model.config)
            if groups:
                rows = torch.tensor([row_of[i] for i in segment], device=device)
                if cache is prefixes:
                    cache.batch_select_indices(rows)
                else:
                    for layer, prefix in zip(cache.layers, prefixes.layers, strict=True):
                        layer.lazy_initialization(prefix.keys, prefix.values)
                        layer.keys, layer.values = prefix.keys[rows], prefix.values[rows]
            width = max(len(suffixes[i]) for i in segment)
            widths.append(width)
            input_ids, suffix_mask = left_padded([suffixes[i] for i in segment], width, self.pad_id)
            mask = torch.cat([prefix_mask[segment], suffix_mask], dim=1) if groups else suffix_mask
            mask = mask.to(device)
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=mask,
                position_ids=positions_of(mask)[:, prefix_width:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            caches.append(cache)
            masks.append(mask)
            logits.append(out.logits[:, -1].float())
        if len(segments) == 1:
            cache, mask = caches[0], masks[0]
            if n > 1:
                cache.batch_repeat_interleave(n)
                mask = mask.repeat_interleave(n, 0)
        else:
            cache = self.cache(reserve)
            mask = stack_rows(cache, caches, masks, repeats=n)
        self.last = {
            "shared_groups": len(groups),
            # prompt tokens not computed again because a prefix was shared
            "prefix_tokens_saved": sum((len(members) - 1) * length for length, members in groups),
            # forward calls, tokens fed to the model (padding included) and the padding among them
            "prefill_calls": bool(groups) + len(segments),
            "prefill_tokens": len(groups) * prefix_width
            + sum(len(segment) * width for segment, width in zip(segments, widths, strict=True)),
            "prefill_padding": sum(prefix_width - length for length, _m in groups)
            + sum(width - len(suffixes[i]) for segment, width in zip(segments, widths, strict=True) for i in segment),
        }
        return [i for segment in segments for i in segment], cache, mask, torch.cat(logits).repeat_interleave(n, 0)

    def call_tokens(self) -> int:
        """What one more prefill call costs, in prompt tokens (``DecodeOptions.prefill_call_tokens``)."""
        if self.options.prefill_call_tokens is not None:
            return self.options.prefill_call_tokens
        return 64 if self.model.device.type == "cpu" else 512

    def run(
        self,
        token_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        row_seeds: Sequence[int] | None = None,
        processors: Sequence[Any] = (),
    ) -> list[DecodedRow]:
        """Generate ``settings.n`` rows per prompt (row ``prompt * n + sample``). ``row_seeds`` (one per
        row) seed the samplers. ``processors`` adjust the logits: each is called as
        ``processor.score_rows(rows, made, scores)`` with the row numbers in the batch and the tokens
        each has generated so far, and returns the scores."""
        import torch

        n, device = settings.n, self.model.device
        rows = len(token_ids) * n
        sampling = settings.temperature > 0
        if sampling and (row_seeds is None or len(row_seeds) != rows):
            raise ValueError(
                f"sampling needs one seed per row ({rows}), got {None if row_seeds is None else len(row_seeds)}"
            )
        generators = row_generators(row_seeds) if sampling else []
        window = max(n, self.options.max_rows or rows)
        if window < rows and not self.stackable:
            window = rows  # a cache with other layer kinds (sliding windows) cannot be joined safely
        stop_tail = max((len(s) for s in settings.stop), default=0) + 2  # tokens whose text can hold a stop
        eos = torch.tensor(self.eos_ids, device=device)
        lowest = torch.finfo(torch.float32).min
        new_ids: list[list[int]] = [[] for _ in range(rows)]
        ended = [False] * rows
        waiting = list(range(len(token_ids)))[::-1]  # prompts not yet prefilled, next one last
        totals = dict.fromkeys(PREFILL_STAT_KEYS, 0)
        timer = {"prefill": 0.0}

        def admit(room: int) -> tuple[list[int], Any, torch.Tensor, torch.Tensor]:
            """Prefill the next waiting prompts whose rows fit in ``room`` (at least one prompt)."""
            taken = [waiting.pop()]
            while waiting and (len(taken) + 1) * n <= room:
                taken.append(waiting.pop())
            started = time.perf_counter()
            order, cache, mask, logits = self.prefill(
                [token_ids[prompt] for prompt in taken], n, settings.max_new_tokens
            )
            timer["prefill"] += time.perf_counter() - started
            for name in totals:
                totals[name] += self.last[name]
            return [taken[i] * n + sample for i in order for sample in range(n)], cache, mask, logits

        begun = time.perf_counter()
        in_cache, cache, mask, logits = admit(window)  # the row each cache row belongs to
        positions = mask.sum(-1)  # each row's next position: the real tokens before it
        running = set(in_cache)
        dropped = joined = steps = row_steps = idle_row_steps = 0
        while running:
            steps += 1
            row_steps += len(in_cache)
            idle_row_steps += len(in_cache) - len(running)
            scores = logits
            made = [len(new_ids[row]) for row in in_cache]
            if settings.min_new_tokens:
                early = torch.tensor([count < settings.min_new_tokens for count in made], device=device)
                scores[early.nonzero()[:, :1], eos] = lowest
            if processors:
                row_numbers, made_counts = torch.tensor(in_cache), torch.tensor(made)
                for processor in processors:
                    scores = processor.score_rows(row_numbers, made_counts, scores)
            if sampling:
                # one uniform draw per row from its own CPU generator, then the inverse of each row's
                # cumulative distribution, in one call on the model's device
                draws = torch.tensor(
                    [float(torch.rand((), generator=generators[row])) if row in running else 0.0 for row in in_cache],
                    dtype=torch.float64,
                )
                cumulative = warp(scores, settings).softmax(dim=-1).double().cumsum(dim=-1)
                # right=True: the first token whose cumulative share exceeds the draw, never one of
                # probability 0 (a draw of exactly 0 would otherwise pick the first token of the vocabulary)
                picked = torch.searchsorted(cumulative, (draws.to(device) * cumulative[:, -1])[:, None], right=True)
                chosen = picked[:, 0].clamp(max=cumulative.shape[-1] - 1).tolist()
            else:
                chosen = scores.argmax(dim=-1).tolist()
            for i, row in enumerate(in_cache):
                if row not in running:
                    chosen[i] = self.pad_id  # an ended row still in the cache is fed padding
                    continue
                token = chosen[i]
                new_ids[row].append(token)
                if token in self.eos_ids:
                    ended[row] = True
                elif settings.stop and self._stopped(new_ids[row][-stop_tail:], settings.stop):
                    ended[row] = True
                if ended[row] or len(new_ids[row]) >= settings.max_new_tokens:
                    running.discard(row)
            idle = len(in_cache) - len(running)
            join = bool(waiting) and window - len(running) >= max(n, self.options.refill_share * window)
            if idle and (join or not running or idle >= self.options.prune_share * len(in_cache)):
                keep = [i for i, row in enumerate(in_cache) if row in running]
                index = torch.tensor(keep, device=device, dtype=torch.long)
                if keep:
                    cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                chosen = [chosen[i] for i in keep]
                in_cache = [in_cache[i] for i in keep]
                dropped += idle
            if running:
                mask = torch.cat([mask, mask.new_ones(len(in_cache), 1)], dim=1)
                out = self.model(
                    input_ids=torch.tensor(chosen, device=device)[:, None],
                    attention_mask=mask,
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                positions = positions + 1
                logits = out.logits[:, -1].float()
            if join:
                fresh, fresh_cache, fresh_mask, fresh_logits = admit(window - len(running))
                if running:
                    joined_cache = self.cache(settings.max_new_tokens)
                    mask = stack_rows(joined_cache, [cache, fresh_cache], [mask, fresh_mask])
                    cache = joined_cache
                    logits = torch.cat([logits, fresh_logits])
                    positions = torch.cat([positions, fresh_mask.sum(-1)])
                else:
                    cache, mask, logits, positions = fresh_cache, fresh_mask, fresh_logits, fresh_mask.sum(-1)
                in_cache = in_cache + fresh
                running.update(fresh)
                joined += len(fresh)
        self.last = {
            **totals,
            "rows": rows,
            "steps": steps,
            "rows_dropped": dropped,
            "rows_joined": joined,
            "row_steps": row_steps,  # rows in the batch, summed over decoding steps
            "idle_row_steps": idle_row_steps,  # of those, rows that had ended but were not yet dropped
            "prefill_seconds": timer["prefill"],
            "decode_seconds": time.perf_counter() - begun - timer["prefill"],
        }
        return [DecodedRow(ids, done) for ids, done in zip(new_ids, ended, strict=True)]

    @functools.cached_property
    def stackable(self) -> bool:
        """Whether this model's cache is made of plain layers, which :func:`stack_rows` can pad and stack."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) in (DynamicLayer, reserved_layer_class()) for layer in self.cache().layers)

    def _stopped(self, tail: list[int], stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in stop)
