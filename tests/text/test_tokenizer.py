"""The tokenizer layer against an independent reference: Hugging Face transformers' own tokenizer, built
from the same GGUF file (the real SmolLM2-135M-Instruct, and small synthetic GGUFs for the SentencePiece
and Llama 3 paths). Where llama.cpp and transformers disagree we follow llama.cpp (GGUF's home), and those
cases are checked against ids worked out by hand.
"""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest

from jinfer.checkpoints.gguf_vocab import tokenizer_from_gguf, tokenizer_from_gguf_fields
from jinfer.text.detokenizer import IncrementalDetokenizer
from jinfer.text.tokenizer import Tokenizer

HARD = [
    "",
    " ",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "repeated     spaces  and   more",
    "trailing spaces   ",
    "newlines\nand\n\n\nblank lines\n",
    "tabs\tand\t\tmore tabs",
    "windows\r\nline\r\nendings\r\n",
    "café naïve résumé Ångström",
    "combining e\u0301 a\u0300 n\u0303 o\u0308",
    "日本語のテキストと中文字符",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "family 👨‍👩‍👧‍👦 thumbs 👍🏽👍🏿 flag 🏳️‍🌈 🇯🇵",
    "1234567 and 3.14159 and 2024-01-01",
    "def f(x):\n    if x:\n        return x * 2  # double\n\treturn None\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't, I'LL, we've, it's",
    "<html><body class=\"x\">&amp;</body></html>",
]


def random_text(seed: int, n: int) -> str:
    """Code points from ASCII, Latin/Greek/Cyrillic/symbols, CJK and emoji, with spaces and newlines mixed in."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x20, 0x20), (0x0A, 0x0A)]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = chr(rng.randint(lo, hi))
        if not 0xD800 <= ord(c) <= 0xDFFF:
            out.append(c)
    return "".join(out)


def without_spaces_before_digits(text: str) -> str:
    """`text` less the one place where transformers' reading of a 'smollm' GGUF parts from llama.cpp's
    (see test_smollm_digits_are_split_first_as_llama_cpp_does): whitespace right before a number character,
    when the whitespace is a run of two or more or the number is not an ASCII digit (a ' 7' gives the same
    ids both ways, as the vocabulary has no 'Ġ7')."""
    chars = list(text)
    for i in range(1, len(chars)):
        if unicodedata.category(chars[i]).startswith("N") and chars[i - 1].isspace():
            if not "0" <= chars[i] <= "9" or i >= 2 and chars[i - 2].isspace():
                chars[i - 1] = "_"
    return "".join(chars)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# ---- SmolLM2 (byte-level BPE, pre-tokenizer 'smollm') vs transformers --------------------------------------

@pytest.mark.parametrize("text", HARD + [without_spaces_before_digits(random_text(0, 2000))],
                         ids=lambda s: repr(s[:24]))
def test_ids_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=True)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


def test_ids_match_upstream_smollm2_pre_tokenizer(tok, hf_tok):
    """transformers' vocabulary and merges with the pre-tokenizer of SmolLM2's own tokenizer.json (digits
    isolated, then the GPT-2 byte-level split), on text full of whitespace runs before digits."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    upstream = Backend.from_str(hf_tok.backend_tokenizer.to_str())
    upstream.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    text = random_text(4, 3000) + " \n\n12  3\t\t4 \u00a0\u00a05 x   12 \u2470 \u0661"
    assert tok.encode(text) == upstream.encode(text).ids


@pytest.mark.parametrize("text", HARD + [random_text(1, 2000)], ids=lambda s: repr(s[:24]))
def test_decode_round_trip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_smollm_digits_are_split_first_as_llama_cpp_does(tok):
    # llama.cpp's 'smollm' (and SmolLM2's own tokenizer.json) isolates every digit before the GPT-2 split,
    # so the two spaces before '1' stay one piece ('ĠĠ'). transformers' GGUF reader uses the plain GPT-2
    # split here and gives ['Ġ', 'Ġ', '1']; that is where the two disagree, so this is checked by hand.
    spell = lambda s: [tok.id_to_token(i) for i in tok.encode(s)]  # noqa: E731
    assert spell("  1") == ["ĠĠ", "1"]
    assert spell("x   12") == ["x", "ĠĠĠ", "1", "2"]
    assert spell("\n\n1") == ["ĊĊ", "1"]
    assert spell(" \u2470") == ["Ġ", "â", "ĳ", "°"]  # ⑰ is a number too; transformers: ['Ġâ', 'ĳ', '°']
    assert spell("1234567") == list("1234567")


def test_special_tokens_and_metadata(tok, hf_tok):
    assert tok.vocab_size == 49152 == len(hf_tok)
    assert tok.bos_token_id == 1 and tok.id_to_token(1) == "<|im_start|>"
    assert tok.eos_token_ids == (2,) and tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("no such token") is None
    assert tok.id_to_token(10**9) is None
    assert tok.encode("hi")[0] != tok.bos_token_id  # this GGUF says add_bos_token = false
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are matched whole in the text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    with pytest.raises(ValueError, match=r"ids\[1\]=-3"):
        tok.decode([5, -3])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Japan? 日本"},
     {"role": "assistant", "content": "Tokyo"},
     {"role": "user", "content": "And of Italy? 🇮🇹"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["no-system", "system-multiturn"])
def test_chat_template_matches_transformers(tok, hf_tok, messages):
    for gen in (True, False):
        want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    text = tok.apply_chat_template(messages)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


def test_chat_template_rejects_bad_messages(tok):
    good = {"role": "user", "content": "hi"}
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\] must be a str"):
        tok.apply_chat_template([good, {"role": 3, "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] must be a str"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        tok.apply_chat_template([good, "hi"])
    with pytest.raises(TypeError, match="messages must be a list"):
        tok.apply_chat_template("hi")
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(tok.backend).apply_chat_template([good])


def test_chat_template_sandbox_and_helpers(tok):
    from jinja2.exceptions import SecurityError, TemplateError

    t = Tokenizer(tok.backend, bos_token="<|im_start|>", chat_template=(
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"))
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == '<|im_start|>{"role": "user", "content": "é"}'
    with pytest.raises(TemplateError, match="one message only"):
        t.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    tracked = Tokenizer(tok.backend, chat_template="{% for m in messages %}{% generation %}{{ m.content }}"
                                                   "{% endgeneration %}{% endfor %}")
    assert tracked.apply_chat_template([{"role": "assistant", "content": "a"}] * 2) == "aa"
    with pytest.raises(ValueError, match="not a valid jinja template"):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template([])
    evil = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "a"}])


# ---- incremental detokenizer ------------------------------------------------------------------------------

STREAM_TEXT = ("Sure! 👨‍👩‍👧‍👦 loves 日本語 and 中文. 👍🏽 Done 🏳️‍🌈<|im_end|>\n<|im_start|>assistant\n"
               "naïve e\u0301 — ok 🇯🇵🇮🇹")


@pytest.mark.parametrize("skip", [False, True])
def test_detokenizer_deltas_concatenate_to_decode(tok, skip):
    ids = tok.encode(STREAM_TEXT)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the stream does split characters
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    assert "\ufffd" not in full and not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_incomplete_characters_until_flush(tok):
    ids = tok.encode("ok 👍")
    cut = ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in cut]
    assert not any("\ufffd" in d for d in deltas)
    tail = detok.flush()
    assert "".join(deltas) + tail == tok.decode(cut) and tail.endswith("\ufffd")


def test_detokenizer_decodes_a_small_window(tok):
    calls = []

    class Counting:  # DecodeStream steps on the backend, in Rust; jinfer itself decodes only flush()'s tail
        backend = tok.backend

        def decode(self, ids, skip_special_tokens=False):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(random_text(2, 3000) + " 👍")[:-1]  # ends inside a character, so flush() has a tail
    detok = IncrementalDetokenizer(Counting())
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert max(calls) <= 12, "each step should decode a few recent tokens, not the whole sequence"


# ---- save / from_dir -------------------------------------------------------------------------------------

def test_save_from_dir_round_trip_and_transformers_reads_it(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in HARD + [random_text(3, 500)]:
        ids = tok.encode(text)
        assert back.encode(text) == ids == hf.encode(text)
        assert back.decode(ids) == tok.decode(ids)
    assert back.chat_template == tok.chat_template
    assert (back.bos_token_id, back.eos_token_ids, back.vocab_size) == (tok.bos_token_id, tok.eos_token_ids,
                                                                       tok.vocab_size)
    messages = CONVERSATIONS[1]
    assert back.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


def test_from_dir_errors_name_the_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(ValueError, match="add_bos_token"):
        Tokenizer.from_dir(tmp_path)


def test_unsupported_gguf_fields_raise(tok):
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1]}
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model='bert'"):
        tokenizer_from_gguf_fields({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='made-up'"):
        tokenizer_from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "made-up"})
    with pytest.raises(ValueError, match=r"tokenizer.ggml.tokens"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match=r"tokenizer.ggml.eos_token_id=7"):
        tokenizer_from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.eos_token_id": 7})


# ---- synthetic GGUFs: SentencePiece ('llama') and Llama 3 ('gpt2' + 'llama-bpe') ----------------------------

def write_gguf(path, fields: dict) -> None:
    """A GGUF holding only tokenizer metadata (and a token embedding, so that it is a well-formed model)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 8,
                 "attention.head_count": 1, "attention.head_count_kv": 1}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    adders = {"tokenizer.ggml.model": w.add_tokenizer_model, "tokenizer.ggml.pre": w.add_tokenizer_pre,
              "tokenizer.ggml.tokens": w.add_token_list, "tokenizer.ggml.scores": w.add_token_scores,
              "tokenizer.ggml.token_type": w.add_token_types, "tokenizer.ggml.merges": w.add_token_merges,
              "tokenizer.ggml.bos_token_id": w.add_bos_token_id, "tokenizer.ggml.eos_token_id": w.add_eos_token_id,
              "tokenizer.ggml.unknown_token_id": w.add_unk_token_id,
              "tokenizer.ggml.add_bos_token": w.add_add_bos_token, "tokenizer.chat_template": w.add_chat_template}
    for k, v in fields.items():
        adders[k](v)
    w.add_tensor("token_embd.weight", np.zeros((len(fields["tokenizer.ggml.tokens"]), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_both(tmp_path_factory, name: str, fields: dict):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp(name)
    write_gguf(d / f"{name}.gguf", fields)
    return tokenizer_from_gguf(d / f"{name}.gguf"), AutoTokenizer.from_pretrained(d, gguf_file=f"{name}.gguf")


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "n", "é", "你",
              "he", "ll", "▁h", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "at", "▁t", "▁th",
              "▁that", "th", "▁a", "an", "▁an", "nd", "▁and", "▁▁", "ée"]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<ctrl>"]
    n = len(SPM_PIECES)
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
              # scores decide the merge order: longer pieces score higher, ties go to the earlier piece
              "tokenizer.ggml.scores": [0.0] * 259 + [-100.0 + len(p) * 10 - i * 0.01 for i, p in
                                                      enumerate(SPM_PIECES)] + [0.0],
              "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * n + [3],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0}
    return load_both(tmp_path_factory, "spm", fields)


SPM_AGREED = ["hello world", "hello  world", "hello\nworld", "that and hello", "théé 你好 ünïcödé 👍",
              "wor ld hel lo", "a", "hello world  ", "héllo"]


@pytest.mark.parametrize("text", SPM_AGREED)
def test_sentencepiece_matches_transformers(spm, text):
    ours, hf = spm
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text)[0] == 1  # a 'llama' vocabulary adds BOS unless the file says otherwise
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text))


def test_sentencepiece_spaces_follow_llama_cpp(spm):
    # llama.cpp puts one space before the text and after every special token, even where the text already
    # starts with one (so does the original Llama 2 tokenizer.json); transformers' GGUF reader does not.
    ours, _ = spm
    spell = lambda s: [ours.id_to_token(i) for i in ours.encode(s, add_special_tokens=False)]  # noqa: E731
    assert spell(" hello") == ["▁", "▁hello"]  # '▁▁hello': no '▁▁h...' piece, so '▁' stays alone
    assert spell("<ctrl>hello") == ["<ctrl>", "▁hello"]
    assert spell("hello<ctrl> world") == ["▁hello", "<ctrl>", "▁", "▁world"]
    assert ours.decode(ours.encode(" hello"), skip_special_tokens=True) == " hello"


def test_sentencepiece_byte_fallback(spm):
    ours, _ = spm
    ids = ours.encode("好", add_special_tokens=False)  # not in the vocabulary: its three UTF-8 bytes
    assert [ours.id_to_token(i) for i in ids] == ["▁", "<0xE5>", "<0xA5>", "<0xBD>"]
    assert ours.decode(ids) == "好"
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.push(i) for i in ids]
    assert deltas == ["", "", "", "好"] and detok.flush() == ""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


LLAMA3_WORDS = ["Hello", "Ġworld", "Ġhello", "ĠI", "'s", "'S", "123", "456", "12", "Ġ(", "ĠĠ", "ĠĠĠ", "ĊĊ", "Ċ",
                "ĠDON", "'T", "Ġthe", "Ġcat", "$hello", "Ġ$", ".Ċ"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    alphabet = list(bytes_to_unicode().values())
    vocab, merges = list(alphabet), []
    for w in LLAMA3_WORDS:  # merges that build each word left to right
        for k in range(2, len(w) + 1):
            left, right = w[:k - 1], w[k - 1]
            if w[:k] not in vocab:
                vocab.append(w[:k])
                merges.append(f"{left} {right}")
    vocab.append("Ġxyz")  # in the vocabulary but not reachable by merges (see ignore_merges below)
    tokens = vocab + LLAMA3_SPECIAL
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [1] * len(vocab) + [3] * len(LLAMA3_SPECIAL),
              "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
              "tokenizer.ggml.eos_token_id": tokens.index("<|end_of_text|>"),
              "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": template}
    return load_both(tmp_path_factory, "llama3", fields)


LLAMA3_TEXTS = ["Hello world", "1234567", "12 456 7890", "I'S DON'T it's", "Hello\n\n\nworld", "$hello (the cat)",
                "  \n  x", "tabs\t\tand\r\n", "日本 👍🏽 é", "Hello world.\n\n", "<|start_header_id|>user<|end_header_id|>"]


@pytest.mark.parametrize("text", LLAMA3_TEXTS)
def test_llama3_pre_tokenizer_matches_transformers(llama3, text):
    ours, hf = llama3
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_llama3_metadata_and_chat(llama3):
    ours, hf = llama3
    assert ours.bos_token_id == ours.token_to_id("<|begin_of_text|>") == ours.encode("x")[0]
    assert ours.eos_token_ids == (ours.token_to_id("<|end_of_text|>"), ours.token_to_id("<|eot_id|>"))
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    spell = lambda s: [ours.id_to_token(i) for i in ours.encode(s, add_special_tokens=False)]  # noqa: E731
    assert spell("1234567") == ["123", "456", "7"]  # digits in threes


def test_llama3_ignore_merges_as_llama_cpp(llama3):
    # llama.cpp sets ignore_merges for Llama 3: a piece that is itself a token is taken whole, even if the
    # merges could not build it. transformers' GGUF reader does not, so this one is checked by hand.
    ours, _ = llama3
    assert [ours.id_to_token(i) for i in ours.encode(" xyz", add_special_tokens=False)] == ["Ġxyz"]


def test_llama3_default_add_bos_from_pre():
    vocab = list(bytes_to_unicode().values()) + ["<|begin_of_text|>"]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.merges": [],
              "tokenizer.ggml.token_type": [1] * 256 + [3], "tokenizer.ggml.bos_token_id": 256}
    assert tokenizer_from_gguf_fields({**fields, "tokenizer.ggml.pre": "llama-bpe"}).encode("a")[0] == 256
    assert tokenizer_from_gguf_fields({**fields, "tokenizer.ggml.pre": "qwen2"}).encode("a")[0] != 256
    no_bos = tokenizer_from_gguf_fields({**fields, "tokenizer.ggml.pre": "llama-bpe",
                                         "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("a") == [no_bos.token_to_id("a")]
