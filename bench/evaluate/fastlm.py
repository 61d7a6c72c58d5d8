"""lm-eval's HFLM with a faster ``loglikelihood``: each shared context is run once for all its choices.

Stock HFLM runs context + continuation once per choice, so a 4-choice HellaSwag question pushes its context
through the model four times. Here requests are grouped by context. Where the model takes a custom 4-D
attention mask (sdpa or eager attention, full or sliding layers), each context and all its choices are packed
into a row, several groups to a row (``packing``), and a batch of rows within a token budget is scored in ONE
forward, with almost no padding.
Otherwise a batch of contexts (left padded) runs once with the KV cache, the cache rows are repeated per
choice, and the continuations run in one more forward per length bucket. Either way the scores are the
log-likelihoods and greedy flags stock HFLM returns (tested to float tolerance on every family), so lm-eval's
metrics are unchanged. Requests longer than the model's context window go to stock HFLM, which truncates
them its own way.
"""

from __future__ import annotations

import copy

import torch
from lm_eval.models.huggingface import HFLM

from bench.evaluate import packing
from bench.models import kv_cache_kwarg, returned_kv_cache

TOKENS_PER_BATCH = 2048  # tokens per forward, padding included: past this a CPU gains nothing
GPU_TOKENS_PER_BATCH = 16384  # a GPU needs more to fill; only the scored positions' logits go to float32
ROW_TOKENS, GPU_ROW_TOKENS = 256, 2048  # packed row length; a longer group gets a row of its own
PACKED_ROWS = 512  # rows per packed forward; the token budget is what binds

Request = tuple[tuple[str, str] | None, list[int], list[int]]


def batches_by_tokens(lengths: list[int], budget: int, max_rows: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first, cut into batches whose rows x longest stays within budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def buckets_by_length(lengths: list[int], keep: float = 0.7) -> list[list[int]]:
    """Indices of the non-zero ``lengths``, longest first, cut where a row would be under ``keep`` of its bucket's
    longest: continuations of very different lengths do not pad each other."""
    order = [i for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]) if lengths[i] > 0]
    out: list[list[int]] = []
    for i in order:
        if out and lengths[i] >= keep * lengths[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class SharedContextLM(HFLM):
    """HFLM whose ``_loglikelihood_tokens`` runs each distinct context once (see the module docstring)."""

    tokens_per_batch = TOKENS_PER_BATCH
    stats: dict[str, int]

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        self.stats = getattr(self, "stats", None) or {"tokens": 0, "padded": 0, "forwards": 0}
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        stock = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(ctx) + len(cont) > self.max_length:
                stock.append(i)
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        if stock:
            answers = super()._loglikelihood_tokens([requests[i] for i in stock], True, override_bs)
            for i, answer in zip(stock, answers, strict=True):
                out[i] = answer
        contexts = list(groups)
        choices = [[requests[i][2] for i in groups[c]] for c in contexts]

        def settle(g: int, answers: list[tuple[float, bool]]) -> None:
            for i, answer in zip(groups[contexts[g]], answers, strict=True):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

        gpu = self.device.type == "cuda"
        budget = GPU_TOKENS_PER_BATCH if gpu else self.tokens_per_batch
        layout = packing.mask_layout(self.model)
        if layout is not None:
            lengths = [packing.group_length(c, x) for c, x in zip(contexts, choices, strict=True)]
            rows = packing.fill_rows(lengths, GPU_ROW_TOKENS if gpu else ROW_TOKENS)
            for batch in batches_by_tokens([sum(lengths[g] for g in r) for r in rows], budget, PACKED_ROWS):
                packed = [[(list(contexts[g]), choices[g]) for g in rows[b]] for b in batch]
                for b, row_answers in zip(batch, self._score_packed(packed, layout), strict=True):
                    for g, answers in zip(rows[b], row_answers, strict=True):
                        settle(g, answers)
            return out  # type: ignore[return-value]
        max_rows = max(1, int(self.batch_size)) if str(self.batch_size).isdigit() else 64
        for batch in batches_by_tokens([len(c) for c in contexts], budget, max_rows):
            answers = self._score([list(contexts[g]) for g in batch], [choices[g] for g in batch])
            for g, group_answers in zip(batch, answers, strict=True):
                settle(g, group_answers)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_packed(self, rows: list[list[packing.Group]], kinds: tuple[str, ...]) -> list[list[list[tuple]]]:
        """Rows of groups (a context and its choices), packed (``packing``) and scored in one forward; per row,
        per group, per choice: (sum of the choice's log-probs, whether every token was the greedy one)."""
        model, dev = self.model, self.device
        packed = []
        for groups in rows:
            row = packing.Row()
            for context, choices in groups:
                row.add(context, choices)
            packed.append(row)
        ids, positions, docs, segments = packing.tensors(packed)
        mask = packing.attention_mask(positions, docs, segments, kinds, getattr(model.config, "sliding_window", None),
                                      model.dtype)
        mask = {k: m.to(dev) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(dev)
        logits = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=positions.to(dev),
                       use_cache=False).logits
        self._count(docs >= 0, 1)
        picks = [(b, g, j, i, t) for b, row in enumerate(packed) for g, group in enumerate(row.picks)
                 for j, choice in enumerate(group) for i, t in choice]
        where = torch.tensor([[b, i] for b, _, _, i, _ in picks], device=dev)
        chosen = logits[where[:, 0], where[:, 1]].float()
        target = torch.tensor([t for *_, t in picks], device=dev)
        logp = chosen.gather(-1, target[:, None]).squeeze(-1) - chosen.logsumexp(-1)
        hit = chosen.argmax(-1) == target
        totals: dict[tuple[int, int, int], list] = {}
        for (b, g, j, _, _), lp, h in zip(picks, logp.tolist(), hit.tolist(), strict=True):
            acc = totals.setdefault((b, g, j), [0.0, True])
            acc[0] += lp
            acc[1] = acc[1] and h
        return [[[tuple(totals[b, g, j]) for j in range(len(group))] for g, group in enumerate(row.picks)]
                for b, row in enumerate(packed)]

    @torch.inference_mode()
    def _score(self, contexts: list[list[int]], choices: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """Sum of log-probs and greedy flag of every choice's tokens after its context."""
        model, dev = self.model, self.device
        width = max(map(len, contexts))
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for b, ctx in enumerate(contexts):
            ids[b, width - len(ctx):] = torch.tensor(ctx)
            mask[b, width - len(ctx):] = 1
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        first = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=position.to(dev),
                      use_cache=True)
        self._count(mask, 1)
        head = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # predicts each choice's first token
        rows = [(b, cont) for b, conts in enumerate(choices) for cont in conts]
        tails: dict[int, torch.Tensor] = {}  # row -> log-probs of its continuation's later tokens
        cache = returned_kv_cache(first)
        for bucket in buckets_by_length([len(cont) - 1 for _, cont in rows]):
            tails.update(zip(bucket, self._continue(cache, mask, [rows[r] for r in bucket], contexts), strict=True))
        answers: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        for r, (b, cont) in enumerate(rows):
            target = torch.tensor(cont, device=dev)
            lp = head[b, target[0]].clone().unsqueeze(0)
            greedy = head[b].argmax() == target[0]
            if len(cont) > 1:
                steps = tails[r]
                lp = torch.cat([lp, steps.gather(-1, target[1:].unsqueeze(-1)).squeeze(-1)])
                greedy = greedy & (steps.argmax(-1) == target[1:]).all()
            answers[b].append((float(lp.sum()), bool(greedy)))
        return answers

    def _continue(self, cache, mask: torch.Tensor, rows: list[tuple[int, list[int]]],
                  contexts: list[list[int]]) -> list[torch.Tensor]:
        """Log-probs [len(cont) - 1, V] predicting each row's later continuation tokens, in one forward on a copy
        of the contexts' KV cache with a row per continuation."""
        dev, longest = self.device, max(len(cont) - 1 for _, cont in rows)
        mine = copy.deepcopy(cache)
        mine.batch_select_indices(torch.tensor([b for b, _ in rows], device=dev))
        inp = torch.zeros(len(rows), longest, dtype=torch.long)
        more = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, (_, cont) in enumerate(rows):
            inp[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            more[r, : len(cont) - 1] = 1
        starts = torch.tensor([len(contexts[b]) for b, _ in rows]).unsqueeze(1)
        full_mask = torch.cat([mask[[b for b, _ in rows]], more], dim=1)
        logits = self.model(input_ids=inp.to(dev), attention_mask=full_mask.to(dev),
                            position_ids=(starts + torch.arange(longest)).to(dev), use_cache=True,
                            **{kv_cache_kwarg(self.model): mine}).logits.float()
        self._count(more, 1)
        logp = logits - logits.logsumexp(-1, keepdim=True)
        return [logp[r, : len(cont) - 1] for r, (_, cont) in enumerate(rows)]

    def _count(self, mask: torch.Tensor, forwards: int) -> None:
        self.stats["tokens"] += int(mask.sum())  # a 0/1 or boolean mask of the real tokens
        self.stats["padded"] += int(mask.numel())
        self.stats["forwards"] += forwards
