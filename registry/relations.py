"""Relations: how a checkpoint was made from its parents. One record per relation, the one
place that says what a relation means: the registry checks names against it, Hub sync maps
it to the Hub's `base_model_relation`, and the app reads its description.

The list is extensible: a third-party plugin may record its own lowercase word (see
`check_relation`); such a relation has no description here, and a card calls it `finetune`
(weights derived from the parents'), with our word as a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

# The Hub's documented base_model_relation values.
HUB_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


class RelationError(ValueError):
    """A relation name that is not a lowercase word."""


@dataclass(frozen=True)
class Relation:
    name: str
    description: str
    hub: str | None  # the Hub's base_model_relation; None: the card names none (roots,
    #                  artifacts that are not models) and the Hub infers what it can


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("import", "brought into the lab from a folder or a Hub id", None),
    Relation("pretrain", "trained from scratch by a pre-training job (a root: no parents)",
             None),
    Relation("finetune", "the parent's weights trained further on task data", "finetune"),
    Relation("adapter", "a PEFT adapter (LoRA, ...) trained on top of its base", "adapter"),
    Relation("adapter_merge", "an adapter folded into its base: a full checkpoint",
             "finetune"),
    Relation("continue_pretrain", "the parent pre-trained further on domain text",
             "finetune"),
    Relation("merge", "several parents' weights combined (mergekit)", "merge"),
    Relation("prune", "the parent with weights, heads or layers removed", "finetune"),
    Relation("scale", "the parent with layers grown or cut (block expansion)", "finetune"),
    Relation("quantized", "the parent's weights at a lower precision (a Hub card said so)",
             "quantized"),
    # A GGUF file written from the parent (plugins/export): its weights in F16, BF16 or a
    # block type (Q8_0, Q4_0, ...). On the Hub that is what "quantized" says (a lower-precision
    # copy of the base); an F32 export is no lower precision, but the same kind of copy, and
    # the Hub has no closer word.
    Relation("export", "the parent written as a GGUF file (llama.cpp), in F16 or quantized",
             "quantized"),
    Relation("task_vector", "a fine-tune minus its base: a weight difference, not a model",
             None),
    Relation("task_vector_apply", "a target plus scaled task vectors (task arithmetic)",
             "merge"),
    Relation("graft", "a target with a task vector's most important entries grafted in",
             "merge"),
)}


def check_relation(name: str) -> str:
    """`name` if it is a known relation or a plugin's own lowercase word; else RelationError."""
    if not (isinstance(name, str) and name and name.replace("_", "").isalnum()
            and name.isascii() and name.islower() and len(name) <= 64):
        raise RelationError(f"relation {name!r} must be a lowercase word such as "
                            f"{', '.join(RELATIONS)}")
    return name


def describe(name: str) -> str:
    """A relation's one-line description ("" for a plugin's own word)."""
    known = RELATIONS.get(name)
    return known.description if known else ""


def hub_relation(name: str) -> str | None:
    """The Hub's base_model_relation for a checkpoint of relation `name` that has parents on
    the Hub: the table's word, `finetune` for a plugin's own relation."""
    known = RELATIONS.get(name)
    return known.hub if known else "finetune"


def from_hub(hub_word: str | None) -> str:
    """Our relation for a Hub card's base_model_relation (anyone's text): the Hub's four
    words are ours too; anything else (or nothing) reads as `finetune`."""
    return hub_word if hub_word in HUB_BASE_MODEL_RELATIONS else "finetune"
