"""Build small Llama-architecture causal LMs and BPE tokenizers locally (no hub downloads).

Used by the demo lab and by the test fixtures, the way mergekit's tests build `picollama`.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as PreTrainedTokenizerFast.

    Byte-level: every string encodes (no unknown characters). BOS is prepended on encode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def llama_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int | None = None,
                 max_positions: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or hidden_size * 8 // 3,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def build_llama(config, seed: int = 0):
    """A freshly initialised LlamaForCausalLM in float32, deterministic for a seed."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def pack_blocks(token_ids: list[int], block_size: int):
    """Cut a token stream into (N, block_size) training blocks, dropping the ragged tail."""
    import torch

    n = len(token_ids) // block_size
    return torch.tensor(token_ids[:n * block_size], dtype=torch.long).view(n, block_size)
