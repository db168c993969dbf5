"""`jinfer chat`: an interactive multi-turn conversation with a model, in the terminal.

Each line read is a user turn; the reply streams as it is generated, under the model's chat template over
the whole conversation so far (its prompt pages come from the prefix cache, so earlier turns are not
recomputed), and is followed by its token count and speed. `/reset` forgets the conversation, `/exit` or
end of input (Ctrl-D) ends it.
"""

from __future__ import annotations

import time
from typing import TextIO

from jinfer.inputs import SamplingParams

HELP = "/reset: start over, /exit or Ctrl-D: quit"


def chat_repl(llm, sampling: dict, stdin: TextIO, stdout: TextIO, stderr: TextIO, system: str | None = None,
              prompt_marker: str = "> ") -> int:
    """Runs the conversation until /exit or end of input. `sampling`: SamplingParams fields; a None
    max_tokens means the rest of the context, as the HTTP chat endpoint's default."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    print(f"jinfer chat ({HELP})", file=stderr)
    while True:
        stdout.write(prompt_marker)
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            del history[start:]
            print("(conversation reset)", file=stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            prompt = llm.chat_prompt(history)
        except ValueError as e:
            history.pop()
            print(f"jinfer chat: {e}", file=stderr)
            continue
        fields = dict(sampling)
        if fields.get("max_tokens") is None:
            fields["max_tokens"] = max(1, llm.engine.max_model_len - len(prompt.ids))
        began = time.perf_counter()
        reply, out = [], None
        for delta, out in llm.stream_outputs(prompt, SamplingParams(**fields)):
            stdout.write(delta)
            stdout.flush()
            reply.append(delta)
        elapsed = time.perf_counter() - began
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        n = len(out.token_ids) if out is not None else 0
        print(f"[{n} tokens, {n / elapsed:.1f} tok/s, {out.finish_reason if out else 'none'}]", file=stderr)
