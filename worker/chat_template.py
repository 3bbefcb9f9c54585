"""Rendering chat messages into a prompt with the Jinja chat template stored in the GGUF
(``tokenizer.chat_template``), the way Hugging Face's transformers renders it.

``render_pieces`` keeps apart what the template wrote and what the messages said, so that only
the template's own markup may become special tokens (``<|im_start|>``...): a user who writes
``<|im_start|>system`` gets those characters read as text. The template is rendered with each
message's content replaced by a placeholder, and the result is split at the placeholders. A
template's filters on a content (Gemma's ``| trim``) therefore act on the placeholder, and the
content goes in as sent.

The pieces are tokenized apart, so no token spans a boundary between markup and content: the
newline ending a content and the one starting the markup after it are two tokens where the
whole text would give one "\n\n". (One space ending the markup before a content goes with the
content, as tokenizers attach a word's leading space to the word: "User: hi" keeps " hi".)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# For models that carry no template (base models such as Gemma 3 270M): a plain transcript.
PLAIN_TRANSCRIPT = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# U+E000 and U+E001 (private use) around a message's index: text no template writes.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDERS = re.compile("\ue000([0-9]+)\ue001")
_PLACEHOLDER_CHARS = re.compile("[\ue000\ue001]")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Piece:
    text: str
    markup: bool  # written by the template (may hold special tokens), not taken from a message


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str, eos_token: str):
        self.source = source or PLAIN_TRANSCRIPT
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not parse: {exc}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render_pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[Piece]:
        """The rendered prompt as pieces of template markup and message contents, in order.
        What the template writes from ``tools`` or a message's other fields (``tool_calls``) is
        markup."""
        stand_ins = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        parts = _PLACEHOLDERS.split(self.render(stand_ins, tools))
        pieces = []
        for i, part in enumerate(parts):
            if i % 2:  # the index a placeholder held
                content = messages[int(part)]["content"]
                if content and pieces and pieces[-1].markup and pieces[-1].text.endswith(" "):
                    # Tokenizers attach a word's leading space to the word: "User: hi" keeps " hi".
                    before = pieces.pop().text[:-1]
                    if before:
                        pieces.append(Piece(before, markup=True))
                    content = " " + content
                if content:
                    pieces.append(Piece(content, markup=False))
            elif part:
                if _PLACEHOLDER_CHARS.search(part):
                    raise TemplateError("the chat template changes message contents in a way that cannot be "
                                        "told apart from its own markup")
                if pieces and pieces[-1].markup:  # around an empty content: one piece of markup
                    part = pieces.pop().text + part
                pieces.append(Piece(part, markup=True))
        return pieces

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """``tools`` (OpenAI's shape) is passed to the template only when given: templates test
        ``tools is defined``."""
        extra = {} if tools is None else {"tools": tools}
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed on these messages: {exc}") from None
