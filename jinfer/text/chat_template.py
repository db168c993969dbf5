"""Chat templates: a checkpoint's jinja source rendered as transformers' `apply_chat_template` renders it.

A `ChatTemplate` holds one template and the BOS/EOS texts it may use; `render(messages)` checks the
messages ([{'role': str, 'content': str}, ...]) and returns the prompt text.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self._specials = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        self._compiled = None  # compiled on the first render: most engines never render a chat

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """With the variables that transformers gives a template (`tools` and `documents` are None)."""
        check_messages(messages)
        if self._compiled is None:
            self._compiled = compile_chat_template(self.source)
        return self._compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._specials)


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__}")


def compile_chat_template(source: str):
    """A `jinja2.Template` in the environment transformers renders chat templates in: sandboxed (templates
    are untrusted code), trim_blocks/lstrip_blocks, loop controls, a non-escaping `tojson`,
    `raise_exception`, `strftime_now`, and `{% generation %}` blocks rendered as plain content."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid jinja template (line {e.lineno}): {e.message}") from e
