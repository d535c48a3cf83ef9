"""Tiny random-weight backbones with a real (small) byte-level BPE tokenizer, saved by path."""

from __future__ import annotations

from pathlib import Path

import torch

from services.bench.common import free_port  # noqa: F401  (the one free-port picker; tests import it from here)

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




def architecture_configs(vocab: int) -> dict:
    """A tiny config of every architecture the SideNet is tested on (transformers builds them):
    GQA where the architecture has it (MQA for Gemma), sliding windows shorter than the tests' texts, q/k norms,
    fused projections, partial rotary, parallel residuals, logit scaling and soft-capping."""
    import transformers as T

    ids = dict(vocab_size=vocab, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    common = dict(**ids, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    return {
        "llama": T.LlamaConfig(**common),
        "mistral": T.MistralConfig(**common, sliding_window=24),
        "qwen2": T.Qwen2Config(**common),
        "qwen3": T.Qwen3Config(**common, head_dim=16),
        "gemma": T.GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=16),  # MQA, as Gemma 2B
        "gemma2": T.Gemma2Config(**common, head_dim=16, sliding_window=24),
        "gemma3_text": T.Gemma3TextConfig(**common, head_dim=16, sliding_window=24),
        "phi3": T.Phi3Config(**common),
        "olmo2": T.Olmo2Config(**common),
        "granite": T.GraniteConfig(**common, attention_multiplier=0.5, residual_multiplier=0.7,
                                   embedding_multiplier=3.0, logits_scaling=2.0),
        "starcoder2": T.Starcoder2Config(**common, sliding_window=24),
        "gpt2": T.GPT2Config(**ids, n_embd=64, n_layer=6, n_head=4, n_positions=512),
        "gpt_neox": T.GPTNeoXConfig(**ids, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                    num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5),
        "falcon": T.FalconConfig(**ids, hidden_size=64, num_hidden_layers=6, num_attention_heads=4),
    }


def save_architecture(path: Path, arch: str, std: float = 0.2, seed: int = 0) -> Path:
    """A tiny random model of architecture `arch` (architecture_configs) with weights drawn from
    N(0, std²) (see conftest.liven), saved by path with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(architecture_configs(len(tokenizer))[arch])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
