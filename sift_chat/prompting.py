"""What the model reads: a conversation in the chat model's template, fitted into its context.

`ChatTemplate` renders `generation.conversation` (the instruction, the passages read, the history
and the question) with the tokenizer's chat template and shortens it to a token budget, the
oldest turns first, in a few renderings however long the history (`fit`, `first_fitting`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .generation import conversation


class ChatTemplate:
    """A tokenizer's chat template: render, tokenise, fit a conversation, and the tokens that end a turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids(tokenizer)
        self._overhead: dict[str, int] | None = None  # tokens the template adds around a message

    def fit(self, prompt: str, history: Sequence[dict], passages: Sequence[str],
            budget: int) -> tuple[torch.Tensor, str | None]:
        """The token ids of the conversation (`generation.conversation`) in the template, and a
        notice when it had to be shortened to fit `budget` tokens (oldest turns first, two at a
        time, then the start of the prompt).

        In time linear in the conversation's length: each turn is tokenised once, the length
        without its oldest turns estimated from a running sum (`_kept_from`), and the template
        rendered for the estimate and its neighbour only (O(log turns) renderings where the
        template is not a plain sum of its messages)."""
        passages = list(passages)
        notice = None
        turns = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]
        start, ids = self._kept_from(prompt, turns, passages, budget)
        if start > 0:
            notice = "the conversation is longer than the model's context: older turns were left out"
        if len(ids) > budget:
            overflow = len(ids) - budget
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompt = self.tokenizer.decode(prompt_ids[overflow + 8:])
            ids = self.ids(conversation(prompt, [], passages))[-budget:]
            notice = (f"the message is longer than the model's context ({budget} tokens): "
                      f"only its last part was read")
        return torch.tensor([ids], dtype=torch.long), notice

    def _kept_from(self, prompt: str, turns: list[dict], passages: list[str], budget: int) -> tuple[int, list[int]]:
        """(s, ids): the conversation keeps `turns[s:]`, the fewest dropped (two at a time, the
        oldest first, a last odd one alone) for its ids to fit in `budget`; all dropped when even
        none fits. The same s and ids as rendering after each drop, found with a few renderings:

            length(s) ≈ length(no turns) + Σ_{i ≥ s} (tokens(content_i) + overhead(role_i))

        where tokens are counted once per turn and the overhead of a message (the template's
        markers) once per role; the first s whose estimate fits is rendered, and so is the one
        before it (`first_fitting` walks on from there when the estimate was off)."""
        starts = [*range(0, len(turns), 2), len(turns)]
        rendered: dict[int, list[int]] = {}

        def fits(i: int) -> bool:
            if i not in rendered:
                rendered[i] = self.ids(conversation(prompt, turns[starts[i]:], passages))
            return len(rendered[i]) <= budget

        last = len(starts) - 1
        if fits(last) and last > 0:  # with no turns it fits: estimate where the turns start to fit
            overhead = self._message_overhead()
            counts = self.tokenizer([t["content"] for t in turns], add_special_tokens=False)["input_ids"]
            costs = [len(ids) + overhead.get(t["role"], 0) for ids, t in zip(counts, turns)]
            length, estimates = len(rendered[last]), [0] * len(starts)
            for i in range(last - 1, -1, -1):  # a running sum, from the newest turns back
                length += sum(costs[starts[i]:starts[i + 1]])
                estimates[i] = length
            guess = next((i for i in range(last) if estimates[i] <= budget), last)
            found = first_fitting(len(starts), fits, guess)
        else:
            found = None
        kept = last if found is None else found
        fits(kept)
        return starts[kept], rendered[kept]

    def _message_overhead(self) -> dict[str, int]:
        """Tokens the chat template adds around one message, by role (measured once)."""
        if self._overhead is None:
            frame = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
            without, word = len(self.ids(frame)), len(self.tokenizer("x", add_special_tokens=False)["input_ids"])
            self._overhead = {role: len(self.ids([frame[0], {"role": role, "content": "x"}, frame[1]]))
                              - without - word for role in ("user", "assistant")}
        return self._overhead

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


def first_fitting(n: int, fits, guess: int) -> int | None:
    """The smallest i in [0, n) with fits(i), for fits False … False True … True (None when none
    fits), searched from `guess`: 2 calls when the guess is right, O(log n) when it is off (a walk
    in steps of 1, 2, 4 … away from the guess, then bisection)."""
    lo, hi = -1, n  # fits(lo) is False and fits(hi) True, as if both were asked
    if fits(guess):
        hi, candidate, step = guess, guess - 1, 1
        while candidate > lo and fits(candidate):
            hi, step = candidate, step * 2
            candidate = hi - step
        lo = max(candidate, lo)
    else:
        lo, candidate, step = guess, guess + 1, 1
        while candidate < hi and not fits(candidate):
            lo, step = candidate, step * 2
            candidate = lo + step
        hi = min(candidate, hi)
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if fits(middle):
            hi = middle
        else:
            lo = middle
    return hi if hi < n else None


def stop_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: EOS, and ChatML's end of turn where the vocabulary has it."""
    eos = tokenizer.eos_token_id
    stop = set(eos) if isinstance(eos, (list, tuple, set)) else {eos} - {None}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        stop.add(im_end)
    return stop
