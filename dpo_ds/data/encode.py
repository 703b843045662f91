"""Turn normalised rows into token ids with an exact prompt/response boundary.

The prompt (the tokenizer's chat template with the generation prompt, or plain "\\n\\nHuman: …\\n\\nAssistant:")
and each response are tokenized separately and concatenated, so the labels are -100 on every prompt position
and the response tokens are exactly `tokenize(response) + end`, where `end` is what the chat template writes
after an assistant turn (e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, without the newline that follows)
or the EOS token without a template. So a row's ids are the template applied to the whole conversation.
"""
from __future__ import annotations

from dpo_ds.errors import DataError, UserError

IGNORE = -100
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
_SENTINEL = "\x00dpo_ds-response\x00"


def subsequence_at(haystack: list, needle: list) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


class Encoder:
    """`render` turns a row's prompt messages into text (a template failure is a bad row); `encode_batch` is
    a `datasets.map(batched=True)` function over rows with `prompt_text`, `chosen` and `rejected`."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos_token: responses must end with one")
        self.tok, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.chat = bool(tokenizer.chat_template)
        self.prompt_prefix = [] if self.chat else self._prefix_specials()
        self.response_end = self._turn_end() if self.chat else [tokenizer.eos_token_id]

    def _prefix_specials(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS), without those it appends (some
        post-processors append EOS, which must not end up inside a prompt)."""
        plain = self.ids(["x y"], special=False)[0]
        full = self.ids(["x y"], special=True)[0]
        start = subsequence_at(full, plain)
        return full[:start] if start > 0 else []

    def _turn_end(self) -> list[int]:
        """The tokens the chat template writes after an assistant message's content, up to the newline
        that separates turns; the EOS token when the template writes nothing there."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses the probe: fall back to EOS
            return [self.tok.eos_token_id]
        end = text[text.find(_SENTINEL) + len(_SENTINEL):].rstrip() if _SENTINEL in text else ""
        return self.ids([end], special=False)[0] if end else [self.tok.eos_token_id]

    def ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def render(self, messages: list[dict], where: str) -> str:
        if not self.chat:
            return "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - templates raise their own errors (jinja2 raise_exception, ...)
            raise DataError(where, "prompt", f"the tokenizer's chat template refused it "
                                             f"({type(e).__name__}: {e})") from None

    def response_text(self, response: str) -> str:
        """Plain prompts end in 'Assistant:', so the reply starts after a space, as in HH transcripts."""
        return response if self.chat else " " + response

    def encode_batch(self, batch: dict) -> dict:
        prompts = [self.prompt_prefix + ids for ids in self.ids(batch["prompt_text"], special=False)]
        out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                               "prompt_length", "prompt_truncated", "response_truncated", "identical")}
        responses = {side: self.ids([self.response_text(r) for r in batch[side]], special=False)
                     for side in ("chosen", "rejected")}
        for i, prompt in enumerate(prompts):
            out["prompt_truncated"].append(len(prompt) > self.max_prompt_length)
            prompt = prompt[-self.max_prompt_length:]  # keep the end: it holds the question being answered
            out["prompt_length"].append(len(prompt))
            budget = self.max_length - len(prompt)
            cut = False
            for side in ("chosen", "rejected"):
                response = responses[side][i] + self.response_end
                cut |= len(response) > budget
                response = response[:budget]
                out[f"{side}_input_ids"].append(prompt + response)
                out[f"{side}_labels"].append([IGNORE] * len(prompt) + response)
            out["response_truncated"].append(cut)
            out["identical"].append(out["chosen_input_ids"][-1] == out["rejected_input_ids"][-1])
        return out
