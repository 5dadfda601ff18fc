"""pretrain: a small Llama pre-trained from scratch on a text file, with its own byte-level BPE
tokenizer (ops/tiny_llama.py, ops/pretrain.py). The defaults build the demo model."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from plugins import LocalFile, Plugin, PluginConfig
from plugins.kit.assets import DEMO_CORPUS


class Config(PluginConfig):
    data: LocalFile = Field(str(DEMO_CORPUS), description=(
        "Text corpus: a UTF-8 .txt file (documents separated by blank lines) or a .jsonl "
        "file with a 'text' field per line. Default: the shipped demo corpus."))
    vocab_size: int = Field(4096, ge=260, le=262_144, description=(
        "Size of the byte-level BPE vocabulary trained on the corpus (at least the 256 bytes "
        "and 4 special tokens)."))
    hidden_size: int = Field(256, ge=8, le=16_384, description="Width of the model "
                                                                "(embedding size).")
    num_layers: int = Field(4, ge=1, le=256, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, le=256, description="Attention heads; must divide "
                                                         "hidden_size.")
    num_kv_heads: int = Field(2, ge=1, le=256, description="Key/value heads (grouped-query "
                                                            "attention); must divide num_heads.")
    intermediate_size: int = Field(688, ge=1, le=65_536, description="Width of the MLP.")
    max_positions: int = Field(512, ge=8, le=131_072, description=(
        "Longest sequence the model accepts (max_position_embeddings); at least "
        "block_length."))
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, le=4096, description="Blocks per optimizer step.")
    learning_rate: float = Field(2e-3, gt=0, le=1, description=(
        "Peak learning rate (10 warm-up steps, then cosine decay)."))
    block_length: int = Field(128, ge=8, le=131_072, description=(
        "Tokens per packed training block (the corpus is one token stream cut into blocks)."))
    seed: int = Field(0, ge=0, description="Random seed (initial weights and data order).")
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @model_validator(mode="after")
    def _shape(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size "
                             f"({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                             f"({self.num_heads})")
        if self.block_length > self.max_positions:
            raise ValueError(f"block_length ({self.block_length}) must not exceed "
                             f"max_positions ({self.max_positions})")
        return self


def run(config: Config, ctx) -> None:
    from ops.pretrain import pretrain
    from ops.tiny_llama import build_llama, llama_config, pack_blocks, train_bpe_tokenizer
    from plugins.kit.textfiles import read_text_file, sha256_text

    path, text = read_text_file(config.data, "data")
    ctx.log(f"training a {config.vocab_size}-token BPE tokenizer on {path.name} "
            f"({len(text) / 1e6:.1f} MB)")
    tokenizer = train_bpe_tokenizer(text.split("\n\n"), vocab_size=config.vocab_size)
    ids = tokenizer(text)["input_ids"]
    blocks = pack_blocks(ids, config.block_length)  # (N, block_length) long
    if blocks.size(0) == 0:
        raise ValueError(f"data: {path} has {len(ids)} tokens, fewer than one block_length "
                         f"({config.block_length})")
    model_config = llama_config(tokenizer, hidden_size=config.hidden_size,
                                num_layers=config.num_layers, num_heads=config.num_heads,
                                num_kv_heads=config.num_kv_heads,
                                intermediate_size=config.intermediate_size,
                                max_positions=config.max_positions)
    model = build_llama(model_config, seed=config.seed)  # the Trainer places it
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(f"pre-training a {n_params / 1e6:.1f}M-parameter Llama for {config.steps} steps "
            f"on {len(ids):,} tokens ({blocks.size(0)} blocks of {config.block_length})")
    ctx.progress(0.05, "tokenizer ready")

    def on_step(step: int, total: int, loss: float | None) -> None:
        if loss is not None:
            ctx.metric("loss", loss, step=step)
            ctx.log(f"step {step}/{total} loss {loss:.4f}")
        ctx.progress(0.05 + 0.9 * step / total, f"step {step}/{total}")

    losses = pretrain(model, blocks, steps=config.steps, batch_size=config.batch_size,
                      lr=config.learning_rate, seed=config.seed, on_step=on_step)
    ctx.progress(0.96, "writing checkpoint")
    final = losses[-1] if losses else None
    meta = {"corpus": path.name, "corpus_sha256": sha256_text(text), "steps": config.steps,
            "final_loss": final, "parameters": n_params, "tokens": len(ids)}
    # No parents: a model pre-trained from scratch starts its own lineage.
    out = ctx.new_checkpoint("pretrain", parents=[], name=config.name, metadata=meta)
    model.save_pretrained(out.path)
    tokenizer.save_pretrained(out.path)
    ctx.log(f"pre-trained {config.steps} steps; final loss "
            + (f"{final:.4f}" if final is not None else "not logged"))
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="pretrain",
    order=25,
    title="Pre-train",
    description="Pre-train a small Llama from scratch on a text file, with a byte-level BPE "
                "tokenizer trained on the same text. The defaults build the demo model.",
    Config=Config,
    run=run,
)
