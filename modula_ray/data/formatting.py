"""Chat formatting with the base model's template; loss only on the response; optional packing.

``encode_example`` renders ``[user: prompt, assistant: response]`` with the tokenizer's chat
template and labels every prompt token ``-100``, so the loss sees only the answer and its
end-of-turn token. A row longer than ``max_length`` loses tokens from the start of its prompt
body first (the template's shared head stays, and at least ``max_length // 4`` tokens of the
prompt's end: the question and the assistant header), so its response stays whole where it
can; only what is still too long is cut from the response's end. ``encode_rows`` counts both
cuts (``prompt_cut``, ``response_cut``; ``truncated``: either) and the rows left with no
response token (``dropped``, only when ``max_length`` cannot hold the head and a prompt tail):
truncation is reported, never silent.

With ``route_labels`` (``{row domain: routed expert index}``, for ``route_loss_coef``), every
token from the end of the template's shared head (system prompt and user header: the same for
every row, so it carries no domain) to the end of the response gets the row's expert index, the
other tokens -100 (``Encoded.route_labels``; ``collate`` adds ``batch["route_labels"]``).

``pack`` concatenates examples into rows of at most ``max_length`` tokens with
``position_ids`` restarting at 0 per example; given ``position_ids`` and no attention mask,
transformers builds a block-diagonal causal mask, so packed examples never see each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None
    route_labels: list[int] | None = None
    prompt_cut: int = 0                  # prompt-body tokens removed from the left
    response_cut: int = 0                # response tokens removed from the right


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0                   # rows cut in any way
    prompt_cut: int = 0                  # rows whose prompt lost its start
    response_cut: int = 0                # rows whose response lost its end
    dropped: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.response_tokens} scored); "
                f"{self.truncated} truncated at max_length ({self.prompt_cut} prompts cut from the left, "
                f"{self.response_cut} responses cut at the end), {self.dropped} dropped with no response left")


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt as the model sees it at generation time."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}])


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant's turn."""
    return _render(tokenizer, messages, True)


def shared_head_length(tokenizer) -> int:
    """Tokens that the chat template puts before every user prompt alike (system prompt, user header)."""
    a, b = prompt_ids(tokenizer, "a"), prompt_ids(tokenizer, "b")
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_example(tokenizer, prompt: str, response: str, max_length: int, *, route_label: int | None = None,
                   head_length: int | None = None) -> Encoded:
    """One chat-formatted row within ``max_length`` (see the module docstring for the cut).
    ``head_length``: the template's shared head (``shared_head_length``; computed when a cut or
    ``route_label`` needs it), which is never cut and gets no route label."""
    head = prompt_ids(tokenizer, prompt)
    full = _render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                   False)
    if full[:len(head)] != head:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
    if head_length is None:
        head_length = shared_head_length(tokenizer) if (route_label is not None or len(full) > max_length) else 0
    head_length = min(head_length, len(head))
    over = max(0, len(full) - max_length)
    tail = min(len(head) - head_length, max(1, max_length // 4))   # the prompt's end that always stays
    cut = min(over, len(head) - head_length - tail)
    ids = full[:head_length] + full[head_length + cut:]
    prompt_length = len(head) - cut
    labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
    routes = None if route_label is None else (
        [IGNORE_INDEX] * head_length + [route_label] * (len(ids) - head_length))[:max_length]
    response_cut = max(0, len(ids) - max_length)
    return Encoded(ids[:max_length], labels[:max_length], over > 0, route_labels=routes, prompt_cut=cut,
                   response_cut=response_cut)


def encode_rows(rows, tokenizer, max_length: int, route_labels: dict[str, int] | None = None
                ) -> tuple[list[Encoded], EncodeStats]:
    """Encode schema rows (dicts with prompt/response/id, and domain with ``route_labels``); rows
    with no response token within ``max_length`` are dropped and counted. A domain missing from
    ``route_labels`` gets no label."""
    stats, encoded = EncodeStats(), []
    head_length = shared_head_length(tokenizer)
    for row in rows:
        label = None if route_labels is None else route_labels.get(row["domain"], IGNORE_INDEX)
        example = encode_example(tokenizer, row["prompt"], row["response"], max_length, route_label=label,
                                 head_length=head_length)
        stats.examples += 1
        if example.truncated:
            stats.truncated += 1
            stats.prompt_cut += example.prompt_cut > 0
            stats.response_cut += example.response_cut > 0
            stats.truncated_ids.append(str(row.get("id", stats.examples - 1)))
        scored = sum(label != IGNORE_INDEX for label in example.labels[1:])
        if scored == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(example.input_ids)
        stats.response_tokens += scored
        encoded.append(example)
    return encoded, stats


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Greedy, order-preserving packing into rows of at most ``max_length`` tokens."""
    routed = bool(examples) and examples[0].route_labels is not None
    packed, ids, labels, positions, routes = [], [], [], [], []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_length:
            packed.append(Encoded(ids, labels, False, positions, routes if routed else None))
            ids, labels, positions, routes = [], [], [], []
        ids = ids + example.input_ids
        labels = labels + example.labels
        positions = positions + list(range(len(example.input_ids)))
        routes = routes + (example.route_labels or [])
    if ids:
        packed.append(Encoded(ids, labels, False, positions, routes if routed else None))
    return packed


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding is out of the loss; for packed rows it is its own block."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(example.position_ids)
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    if examples[0].route_labels is not None:
        routes = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            routes[row, :len(example.route_labels)] = torch.tensor(example.route_labels)
        batch["route_labels"] = routes
    return batch
