"""A tiny random-weight Llama and a matching tokenizer, for engine tests that run in seconds."""

from __future__ import annotations

from jinfer.models.config import ModelConfig

TINY = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, max_position_embeddings=256, eos_token_ids=(), bos_token_id=None)

# 8 query heads over 4 KV heads, so KV heads split over model=2 and 4; vocab and MLP width divide by 4.
TINY_MESH = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                        intermediate_size=128, max_position_embeddings=256, eos_token_ids=(), bos_token_id=None)


def tiny_params(seed: int = 0, config: ModelConfig = TINY):
    import jax  # here, so that the tokenizer and configs load without jax (jinfer.testing.fake_runner)

    from jinfer.models import llama

    return llama.init_params(config, jax.random.key(seed))


def tiny_tokenizer(vocab_size: int = TINY.vocab_size):
    """A word-level tokenizer whose token i is the word 'w{i}' (so any id decodes to text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from jinfer.text.tokenizer import Tokenizer

    vocab = {f"w{i}": i for i in range(vocab_size)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(hf)
