"""Chat templates: turning conversations into (prompt text, completion text) for completion-only losses.

A tokenizer with its own chat template (``tokenizer.chat_template``) is always rendered with it. A base model
without one uses the plain fallback template below, which is part of drpost's contract:

    ### System:\\n{content}\\n\\n        (each turn: a header line, the content, a blank line)
    ### User:\\n{content}\\n\\n
    ### Assistant:\\n{content}\\n\\n
    ### Assistant:\\n                    (the generation prompt)

Which tokens carry the loss: only the **final assistant turn** (the completion). Earlier assistant turns are
context, like user turns. With the tokenizer's template the completion text is the rendered full conversation minus
the rendered prompt (so it includes the template's own end-of-turn marker); with the fallback it is the final
assistant content, and ``tokenize_prompt_completion`` appends EOS. Either way EOS is not doubled and BOS is not
doubled (a BOS written by the template is dropped from the text when the tokenizer adds its own BOS id).
"""

from __future__ import annotations

import logging

from drpost.data.formats import DataError

log = logging.getLogger(__name__)

FALLBACK_HEADERS: dict[str, str] = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
    "tool": "### Tool:\n",
}
TURN_END = "\n\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenize_prompt_completion`` will prepend the BOS id (same rule as there)."""
    return getattr(tokenizer, "bos_token_id", None) is not None and bool(getattr(tokenizer, "add_bos_token", True))


def fallback_render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The plain template for tokenizers without one (see the module docstring)."""
    text = "".join(FALLBACK_HEADERS[m["role"]] + m["content"] + TURN_END for m in messages)
    return text + (FALLBACK_HEADERS["assistant"] if add_generation_prompt else "")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template, or the fallback template when it has none."""
    if not has_chat_template(tokenizer):
        return fallback_render(messages, add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors of arbitrary templates (e.g. a role it refuses)
        raise DataError(f"the tokenizer's chat template failed on these messages: {e}") from e


def _strip_bos_text(tokenizer, text: str) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and adds_bos(tokenizer) and text.startswith(bos):
        return text[len(bos):]
    return text


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Prompt text for generation (RL rollouts): the conversation plus the assistant generation prompt."""
    return _strip_bos_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def split_conversation(tokenizer, prompt_messages: list[dict], completion_messages: list[dict]
                       ) -> tuple[str, str, bool]:
    """(prompt text, completion text, add_eos) for a conversation whose loss covers ``completion_messages``.

    ``add_eos`` is False when the rendered completion already ends with the EOS token's text.
    """
    if not has_chat_template(tokenizer):
        prompt = fallback_render(prompt_messages, add_generation_prompt=True)
        # assistant turns after the first completion message keep their headers
        completion = completion_messages[0]["content"]
        for m in completion_messages[1:]:
            completion += TURN_END + FALLBACK_HEADERS[m["role"]] + m["content"]
        return prompt, completion, True
    prompt = render(tokenizer, prompt_messages, add_generation_prompt=True)
    full = render(tokenizer, prompt_messages + completion_messages, add_generation_prompt=False)
    if full.startswith(prompt):
        completion = full[len(prompt):]
    else:  # templates that rewrite earlier turns; train on the raw content rather than guess a boundary
        log.warning("chat template: rendered prompt is not a prefix of the rendered conversation; "
                    "using the raw assistant content as the completion")
        completion = "".join(m["content"] for m in completion_messages)
    eos = getattr(tokenizer, "eos_token", None)
    add_eos = not (eos and completion.rstrip().endswith(eos))
    return _strip_bos_text(tokenizer, prompt), completion, add_eos


def messages_to_prompt_completion(tokenizer, messages: list[dict]) -> tuple[str, str, bool]:
    """Split a conversation ending in an assistant turn: the loss covers that final turn only."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("a conversation must end with an assistant message (the completion)")
    return split_conversation(tokenizer, messages[:-1], messages[-1:])


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its EOS as pad (logged); DataError if it has neither. Returns it."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise DataError(f"tokenizer {name!r} has neither a pad token nor an EOS token; set tokenizer.pad_token "
                        f"(or tokenizer.eos_token) before training")
    tokenizer.pad_token = eos
    log.info("tokenizer %r has no pad token; using its EOS token %r as pad (padded positions are masked)", name, eos)
    return tokenizer
