"""The offline GPT-2 tokenizer: tiktoken's gpt2 ids, built from local files without touching the network."""
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import tokenizer


@pytest.fixture
def enc():
    return tokenizer.get_encoding()


def test_known_strings_give_gpt2_ids(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello") == [31373]
    assert enc.encode_ordinary(" hello") == [23748]
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode_ordinary("\n") == [198]


def test_vocab_is_gpt2s_50257_with_eot_last(enc):
    assert enc.n_vocab == tokenizer.GPT2_VOCAB_SIZE == 50257
    assert enc.eot_token == tokenizer.EOT_TOKEN == 50256


def test_eot_is_one_special_id_only_when_allowed(enc):
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")  # in ordinary text it is just characters


def test_decode_inverts_encode_on_unicode_heavy_text(enc):
    text = "naïve café — 日本語のテキスト, emoji 🤖🚀👩‍👩‍👧, Ελληνικά, עברית,\ttabs\r\n  spaces\u200b€"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_building_the_encoding_makes_no_network_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    tokenizer.get_encoding.cache_clear()  # build it afresh, under the patch
    assert tokenizer.get_encoding().encode_ordinary("Hello world") == [15496, 995]
