"""Rendering one SafeKey example: the full training text of a (prompt, reasoning response) pair,
with where the query X ends and where the response lies in it (step 1 of :mod:`.data`).

Layer 2 (docs/architecture.md): imports `errors` only.

With a chat template, the prompt is rendered with `add_generation_prompt=True` (the
query X is that whole text: system turn, template tokens and user turn included) and the
conversation with the response as the assistant turn. The rendered prompt must be a prefix of the
rendered conversation and the response (or its stripped form, for templates that `trim` it) must
follow it. Templates that rewrite the assistant turn (DeepSeek-R1's drops everything up to
`</think>`) fail that test; the text is then `rendered prompt + response + eos_token`, which is
what the model sees at generation time. Without a chat template: `prompt + response + eos`.
When the rendered prompt ends with `<think>` (the R1-distill generation prompt ends with
`<think>\\n`) and the response opens with `<think>` too, the response's `<think>` is left out, so
that the text holds one think block (:func:`think_overlap`; one warning per data set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError


@dataclass(frozen=True)
class RenderedExample:
    """The full training text and where its parts are (character offsets into `text`)."""

    text: str
    query_end: int  # end of the rendered prompt (the query X)
    response_shift: int  # character c of the response is character c + response_shift of `text`
    response_start: int  # first character of the response as rendered (after any template trim)
    response_end: int
    dropped: str = ""  # leading text of the response left out because the rendered prompt already ends with it


def _messages(prompt: Any, system_prompt: str | None, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        msgs = [dict(m) for m in prompt]
        if msgs[-1].get("role") == "assistant":
            raise ConfigError(f"{where}: the prompt's last message is an assistant turn; put it in 'response' instead")
    else:
        raise ConfigError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")
    if system_prompt is not None and msgs[0].get("role") != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs


THINK_OPEN = "<think>"


def think_overlap(prompt_text: str, response: str) -> int:
    """Characters at the start of `response` that repeat the end of the rendered prompt: when the
    prompt ends with `<think>` (plus white space), as DeepSeek-R1-distill generation prompts do
    (`<｜Assistant｜><think>\\n`), and the response opens with `<think>` too (as STAR-1 rows do), the
    response's `<think>` and the white space after it; else 0. Dropping them renders the think block
    once, `<think>\\n{thinking}...`, as the reference's assistant turn does."""
    if not prompt_text.rstrip().endswith(THINK_OPEN):
        return 0
    lead = len(response) - len(response.lstrip())
    if not response.startswith(THINK_OPEN, lead):
        return 0
    end = lead + len(THINK_OPEN)
    while end < len(response) and response[end].isspace():
        end += 1
    return end


def render_example(
    tokenizer: Any,
    prompt: Any,
    response: str,
    *,
    use_chat_template: bool | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    where: str = "example",
) -> RenderedExample:
    """The full training text of one example, with the end of the query and where the response lies.

    When the rendered prompt ends with `<think>` and the response opens with it (see
    :func:`think_overlap`), the response's `<think>` is left out (`dropped`), so that the text holds
    one think block; character `c >= len(dropped)` of the response is still character
    `c + response_shift` of the text."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    use = bool(template) if use_chat_template is None else use_chat_template
    eos = getattr(tokenizer, "eos_token", None) or ""
    if not use:
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}: without a chat template the prompt must be a string")
        p = (system_prompt + "\n" if system_prompt else "") + prompt
        d = think_overlap(p, response)
        body = response[d:]
        text = p + body + (eos if not body.endswith(eos) else "")
        return RenderedExample(text, len(p), len(p) - d, len(p), len(p) + len(body), response[:d])
    if not template:
        raise ConfigError(f"{where}: use_chat_template=True but the tokenizer has no chat template (pass chat_template=)")
    msgs = _messages(prompt, system_prompt, where)
    kw = dict(chat_template_kwargs or {})
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template, **kw)
    full = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": response}], tokenize=False, chat_template=template, **kw
    )
    q = len(prompt_text)
    d = think_overlap(prompt_text, response)
    body, dropped = response[d:], response[:d]
    if full.startswith(prompt_text):
        i = full.find(body, q)
        if i >= 0:  # the response follows the prompt (possibly after template text such as '<think>\n')
            return RenderedExample(full, q, i - d, i, i + len(body), dropped)
        stripped = body.strip()
        i = full.find(stripped, q) if stripped else -1
        if i >= 0:
            lead = len(body) - len(body.lstrip())
            return RenderedExample(full, q, i - lead - d, i, i + len(stripped), dropped)
    # The template rewrites the assistant turn (e.g. DeepSeek-R1 drops the reasoning): train on what
    # generation sees, the rendered prompt followed by the response.
    text = prompt_text + body + (eos if eos and not body.endswith(eos) else "")
    return RenderedExample(text, q, q - d, q, q + len(body), dropped)
