"""Chat formatting with the base model's template; loss only on the response.

``encode_example`` renders ``[user: prompt, assistant: response]`` with the tokenizer's
chat template and labels every prompt token ``-100``, so the loss sees only the answer
(and its end-of-turn token). Cutting at ``max_length`` is reported, never silent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt as the model sees it at generation time."""
    return _render(tokenizer, [{"role": "user", "content": prompt}], True)


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> Encoded:
    head = prompt_ids(tokenizer, prompt)
    full = _render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                   False)
    if full[:len(head)] != head:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
    labels = [IGNORE_INDEX] * len(head) + full[len(head):]
    truncated = len(full) > max_length
    return Encoded(full[:max_length], labels[:max_length], truncated)


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
