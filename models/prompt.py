"""Turn chat messages into a prompt string for an in-process model.

"chat_template" uses the tokenizer's own template (SmolLM2-Instruct has one). "transcript"
writes a plain "Customer:/Agent:" transcript for base models without one (Gemma-3-270M), and
stops the answer at the next line. No tokenization happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.base import ChatMessage
from models.config import BackendConfig

_SPEAKER = {"user": "Customer", "assistant": "Agent", "system": "Note", "developer": "Note", "tool": "Tool"}


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    add_special_tokens: bool
    stops: tuple[str, ...]
    # transcripts end in "Agent:", so the answer's first token carries a space to drop
    lstrip: bool = False


def build_prompt(config: BackendConfig, tokenizer: Any, messages: tuple[ChatMessage, ...]) -> Prompt:
    if config.prompt_format == "transcript" or tokenizer.chat_template is None:
        return _transcript(config.system_prompt, messages)
    msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.content} for m in messages]
    if config.system_prompt:
        msgs.insert(0, {"role": "system", "content": config.system_prompt})
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return Prompt(text=text, add_special_tokens=False, stops=())


def _transcript(preamble: str | None, messages: tuple[ChatMessage, ...]) -> Prompt:
    lines = [preamble.strip(), ""] if preamble else []
    for m in messages:
        content = " ".join(m.content.split())  # one line per turn keeps the format unambiguous
        lines.append(f"{_SPEAKER.get(m.role, m.role.title())}: {content}")
    lines.append("Agent:")
    return Prompt(text="\n".join(lines), add_special_tokens=True, stops=("\n",), lstrip=True)
