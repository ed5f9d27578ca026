"""Instruction data on a chat model: the tokenizer's own chat template (`tokenizer.apply_chat_template`).

An example of an instruction task (`TaskSpec.chat`: the `inst-*` tasks, a prompt/target `--dataset`)
becomes a conversation of two turns: the user's (its prompt, stripped of surrounding whitespace) and the
assistant's (its target). `--chat-template auto` (the default) does this whenever the tokenizer has a
template — the packaged SmolLM2-Instruct's comes with its GGUF file (models/decoders.py) — and
`--chat-template none` keeps the plain prompt + target of `batching.encode_generation`.

The tokens of one example:

- prompt: the template rendered for the user's turn with `add_generation_prompt=True`, so it ends
  with the assistant's header (`<|im_start|>assistant\\n` for SmolLM2); generation starts from it;
- target: what the template adds for the assistant's turn: its text and the end-of-turn token, and
  nothing after that token (SmolLM2's template writes a newline there). When the end of turn is not the
  tokenizer's EOS, the EOS follows it, because generation stops at the EOS.

The loss covers the target tokens only (`EncodedLM.prompt_lengths`, as for every generation task), so
the template, the system prompt it may add and the user's turn never count. A sequence longer than
`--max-length` is cut as `encode_generation` cuts it: the target is kept, the prompt loses its start.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.data.batching import EncodedLM, assemble_lm
from fedpeft.errors import FedPeftError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(setting: str, tokenizer) -> bool:
    """Whether instruction examples go through the tokenizer's chat template (`--chat-template`)."""
    return setting == "auto" and has_chat_template(tokenizer)


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_parts(tokenizer, prompt: str, target: str) -> tuple[str, str, str]:
    """(prompt text ending with the assistant's header, the assistant's text as the template writes it,
    the template's text after it up to the end of the turn)."""
    user = [{"role": "user", "content": prompt.strip()}]
    head = _render(tokenizer, user, generation_prompt=True)
    full = _render(tokenizer, user + [{"role": "assistant", "content": target}], generation_prompt=False)
    rest = full[len(head):]
    if not full.startswith(head) or target.strip() not in rest:
        raise FedPeftError("this tokenizer's chat template does not write a conversation as its prompt followed "
                           "by the answer, so the answer's tokens cannot be told apart: use --chat-template none")
    at = rest.index(target.strip()) + len(target.strip())
    return head + rest[:at - len(target.strip())], target.strip(), rest[at:]


def encode_chat(examples: Sequence, tokenizer, max_length: int) -> EncodedLM:
    """Tokenize instruction `GenExample`s through the chat template, as the module docstring says."""
    if max_length < 2:
        raise ValueError("max_length must leave room for a prompt token and a target token")
    parts = [chat_parts(tokenizer, e.prompt, e.target) for e in examples]

    def tokens(k: int) -> list[list[int]]:  # the template writes the special tokens itself
        texts = [part[k] for part in parts]
        return tokenizer(texts, add_special_tokens=False, padding=False)["input_ids"] if texts else []

    heads, answers, tails = tokens(0), tokens(1), tokens(2)
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {eos}
    targets = []
    for a, tail in zip(answers, tails):
        end = next((k + 1 for k, t in enumerate(tail) if t in special), None)
        t = list(a) + (list(tail[:end]) if end is not None else [])  # the end of turn; not what follows it
        if not t or t[-1] != eos:
            t.append(eos)
        targets.append(t)
    return assemble_lm(examples, heads, targets, tokenizer, max_length)
