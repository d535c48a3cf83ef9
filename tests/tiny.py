"""Tiny random-weight backbones with a real (small) byte-level BPE tokenizer, saved by path."""

from __future__ import annotations

from pathlib import Path

import torch

TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. Memory lets a model read far back. "
              "Long documents are read in segments; keys and values go into a bank. ") * 20


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny(path: Path, family: str = "llama", num_layers: int = 6, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=0, tie_word_embeddings=True)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=num_layers, n_head=4, n_positions=512,
                            eos_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A free TCP port on loopback, for servers the tests start."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
