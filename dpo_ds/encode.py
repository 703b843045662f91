"""Turn normalised rows into token ids with an exact prompt/response boundary.

The prompt (chat template with the generation prompt, or plain "\\n\\nHuman: …\\n\\nAssistant:") and each
response are tokenized separately and concatenated, so the response tokens are exactly
`tokenize(response) + [eos]` and the labels are -100 on every prompt position.
"""
from __future__ import annotations

from dpo_ds.errors import UserError

IGNORE = -100
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def response_text(tokenizer, response: str) -> str:
    """Plain prompts end in 'Assistant:', so the reply starts after a space, as in HH transcripts."""
    return response if tokenizer.chat_template else " " + response


class Encoder:
    """`encode_batch` is a `datasets.map(batched=True)` function over normalised rows."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos_token: responses must end with one")
        self.tok, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length

    def ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def encode_batch(self, batch: dict) -> dict:
        chat = bool(self.tok.chat_template)  # a chat template carries its own special tokens
        prompts = self.ids([render_prompt(self.tok, m) for m in batch["prompt"]], special=not chat)
        out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                               "prompt_truncated", "response_truncated")}
        responses = {side: self.ids([response_text(self.tok, r) for r in batch[side]], special=False)
                     for side in ("chosen", "rejected")}
        eos = [self.tok.eos_token_id]
        for i, prompt in enumerate(prompts):
            out["prompt_truncated"].append(len(prompt) > self.max_prompt_length)
            prompt = prompt[-self.max_prompt_length:]  # keep the end: it holds the question being answered
            budget = self.max_length - len(prompt)
            cut = False
            for side in ("chosen", "rejected"):
                response = responses[side][i] + eos
                cut |= len(response) > budget
                response = response[:budget]
                out[f"{side}_input_ids"].append(prompt + response)
                out[f"{side}_labels"].append([IGNORE] * len(prompt) + response)
            out["response_truncated"].append(cut)
        return out
