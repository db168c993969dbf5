"""The jinfer.v1 protocol without a server: the committed generated code matches the .proto, every
SamplingParams field crosses the wire unchanged, and client requests are built as documented."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from jinfer.inputs import InputChecker, SamplingParams
from jinfer.serve import convert
from jinfer.serve.client import build_request
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PROTO = "serve/proto/jinfer/v1/jinfer.proto"
INSTALLED = "jinfer/serve/proto/jinfer/v1/jinfer.proto"  # its path under the installed name, as generate.sh compiles it


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / INSTALLED).parent.mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / INSTALLED)
    out = tmp_path / "descriptor.pb"
    res = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--descriptor_set_out={out}",
                          INSTALLED], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    def clear_json_names(message):  # json_name is protoc's annotation; the Python gencode leaves it out
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:  # a map field's entry type
            clear_json_names(nested)

    for message in fresh.message_type:
        clear_json_names(message)
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)
    assert committed == fresh, "serve/proto is stale: run serve/proto/generate.sh"


def test_every_sampling_field_is_in_the_proto():
    proto_fields = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(SamplingParams)} == proto_fields


def test_sampling_params_round_trip_every_field():
    want = SamplingParams(max_tokens=7, temperature=0.3, top_k=5, top_p=0.85, min_p=0.02, repetition_penalty=1.1,
                          presence_penalty=-0.5, frequency_penalty=1.5, seed=2**32 - 1, stop=("a", "bc"),
                          stop_token_ids=(3, 4), ignore_eos=True, logprobs=2, prompt_logprobs=1, n=2, min_tokens=3,
                          logit_bias={4: -1.5, 7: 100}, include_stop_str_in_output=True, skip_special_tokens=False,
                          structured_outputs={"choice": ["a", "b c"]})
    msg = build_request([1, 2], **dataclasses.asdict(want)).sampling
    inputs = InputChecker(vocab_size=10, max_model_len=32, max_logprobs=5, usable_pages=8, page_size=4)

    def sampling(m):
        return inputs.sampling(convert.sampling_fields(m), "sampling")

    assert sampling(msg) == want
    # Unset fields take SamplingParams' defaults; -1 means no top-k cut, as in SamplingParams.
    assert sampling(pb.SamplingParams()) == SamplingParams()
    assert sampling(pb.SamplingParams(top_k=-1)) == SamplingParams(top_k=0)
    for so in ({"json": '{"type": "object"}'}, {"json_object": True}, {"regex": "a+"}, {"grammar": 'start: "x"'}):
        msg = build_request([1], structured_outputs=so).sampling
        assert sampling(msg) == SamplingParams(structured_outputs=so)
    assert sampling(pb.SamplingParams(temperature=0.0)).temperature == 0.0


def test_build_request():
    assert build_request("hi", stop="x").text == "hi"
    assert list(build_request("hi", stop="x").sampling.stop) == ["x"]
    assert list(build_request([5, 6]).token_ids.ids) == [5, 6]
    chat = build_request(messages=[{"role": "user", "content": "hey"}], request_id="r1")
    assert chat.WhichOneof("prompt") == "chat" and chat.chat.messages[0].content == "hey" and chat.request_id == "r1"
    assert not build_request("hi", seed=None).sampling.HasField("seed")
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        build_request("hi", messages=[])
    with pytest.raises(TypeError, match="unknown sampling argument"):
        build_request("hi", temprature=0.5)


def test_chat_without_a_template_is_refused_naming_the_field():
    from jinfer.testing.tiny import tiny_tokenizer

    inputs = InputChecker(vocab_size=128, max_model_len=32, max_logprobs=5, usable_pages=8, page_size=4,
                          tokenizer=tiny_tokenizer())
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="w1")])
    with pytest.raises(ValueError, match="chat.messages: this model has no chat_template"):
        convert.chat_prompt(inputs, chat, "chat")
