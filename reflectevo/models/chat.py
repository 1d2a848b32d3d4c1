"""What a chat template adds by itself, for the run manifest."""

from __future__ import annotations

from typing import Any


def default_system_message(tokenizer: Any) -> str | None:
    """The system message a chat template adds to a conversation that has none (SmolLM2's: "You are
    a helpful AI assistant named SmolLM, trained by Hugging Face"), or None when it adds none."""
    user, system = "\u2063reflectevo-user\u2063", "\u2063reflectevo-system\u2063"
    try:
        alone = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False)
        framed = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False
        )
    except Exception:  # a template that refuses either conversation adds nothing we can name
        return None
    before = alone[: alone.index(user)]
    opening, closing = framed[: framed.index(system)], framed[framed.index(system) + len(system) : framed.index(user)]
    if before.startswith(opening) and before.endswith(closing) and len(before) >= len(opening) + len(closing):
        return before[len(opening) : len(before) - len(closing)]
    return None
