"""train's objectives beyond supervised fine-tuning (issue 23): distillation from a teacher
(Hinton et al. 2015) and preference tuning on prompt/chosen/rejected pairs with DPO (Rafailov
et al. 2023) or ORPO (Hong et al. 2024). The losses are in ops/preference.py; this module holds
the Config fields, the pair data, the teacher / reference set-up, the lineage edges and the
preview of pairs.

`objective` is a field of its own, not new `method`s: `method` says which parameters train
(full, LoRA, ...) and every objective works with several of them (DPO with LoRA is the common
case), so the two are orthogonal. The form has one METHOD_SELECTOR (`method`), so the objective's
fields are always shown and are refused, naming the field, when the objective does not read
them."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field, ValidationInfo

from plugins import ADVANCED, CheckpointRef

PAIR_OBJECTIVES = ("dpo", "orpo")
# methods whose training loop is the Trainer's, so a custom loss plugs in (tested: full, lora)
OBJECTIVE_METHODS = ("full", "lora", "dora", "qlora", "freeze", "hft")
ADAPTER_METHODS = ("lora", "dora", "qlora")


def _objective(value: str, info: ValidationInfo) -> str:
    method = info.data.get("method")
    if value != "sft" and method is not None and method not in OBJECTIVE_METHODS:
        raise ValueError(f"objective {value} works with method {', '.join(OBJECTIVE_METHODS)}, "
                         f"not {method}")
    return value


def _only_for(objective: str, what: str):
    def check(value, info: ValidationInfo):
        chosen = info.data.get("objective")
        if chosen is None:  # objective itself is invalid: that error names it
            return value
        if chosen == objective and value is None and what == "teacher":
            raise ValueError("objective distill needs a teacher checkpoint (same tokenizer "
                             "as checkpoint)")
        if value is not None and chosen != objective:
            raise ValueError(f"{what} is read only by objective {objective}; objective is "
                             f"{chosen}: leave it empty")
        return value
    return check


Objective = Annotated[Literal["sft", "distill", "dpo", "orpo"], AfterValidator(_objective),
                      Field(description=(
    "What the loss learns. sft: the labels (next-token prediction). distill: the teacher's "
    "distribution (KL at distill_temperature, mixed with the LM loss by distill_alpha). dpo / "
    "orpo: prefer the chosen response to the rejected one of each prompt (data with "
    "prompt_column, chosen_column, rejected_column). Works with methods "
    f"{', '.join(OBJECTIVE_METHODS)}."))]
Teacher = Annotated[Optional[CheckpointRef], AfterValidator(_only_for("distill", "teacher")),
                    Field(description=(
    "distill: the teacher checkpoint, frozen; it must have the same tokenizer (vocabulary) "
    "as checkpoint. Recorded as a parent with role teacher."))]
DistillAlpha = Annotated[float, Field(ge=0, le=1, description=(
    "distill: weight of the distillation loss; 1 - distill_alpha weighs the LM loss on the "
    "labels."), json_schema_extra=ADVANCED)]
DistillTemperature = Annotated[float, Field(gt=0, le=100, description=(
    "distill: softmax temperature T of both models; the KL is scaled by T² (Hinton et al. "
    "2015)."), json_schema_extra=ADVANCED)]
Reference = Annotated[Optional[CheckpointRef], AfterValidator(_only_for("dpo", "reference")),
                      Field(description=(
    "dpo: the frozen reference model. Empty: the starting checkpoint (for lora / dora / qlora "
    "its base with the adapter switched off). Recorded as a parent with role reference."),
    json_schema_extra=ADVANCED)]
Beta = Annotated[float, Field(gt=0, le=100, description=(
    "dpo: beta, how far the policy may move from the reference (0.1 in the paper); orpo: "
    "lambda, the weight of the odds-ratio loss next to the chosen responses' LM loss (0.1)."),
    json_schema_extra=ADVANCED)]
ChosenColumn = Annotated[str, Field(min_length=1, description=(
    "dpo / orpo: the column of preferred responses (the prompt is prompt_column)."),
    json_schema_extra=ADVANCED)]
RejectedColumn = Annotated[str, Field(min_length=1, description=(
    "dpo / orpo: the column of dispreferred responses."), json_schema_extra=ADVANCED)]


# ------------------------------------------------------------------------------ data
def pair_columns(config, columns: list[str], field: str) -> None:
    """Refuse pair data without the prompt, chosen or rejected column, naming the field."""
    for setting in ("prompt_column", "chosen_column", "rejected_column"):
        name = getattr(config, setting)
        if name not in columns:
            raise ValueError(f"{field}: missing column {name!r} ({setting}) for objective "
                             f"{config.objective}; the data has columns {columns}")


def pair_encoder(config, tokenizer):
    from ops.preference import encode_pairs_batch

    def encode(batch: dict) -> dict:
        return encode_pairs_batch(tokenizer, [str(p) for p in batch[config.prompt_column]],
                                  [str(c) for c in batch[config.chosen_column]],
                                  [str(r) for r in batch[config.rejected_column]],
                                  config.max_length)
    return encode


def prepare_pairs(config, ctx, tokenizer) -> tuple:
    """(train, eval or None, info) of encoded pairs, through the lab's tokenization cache."""
    from plugins.kit.data import cached_tokenize, load_rows

    cache = ctx.cache_dir
    rows, fingerprint = load_rows(config.data, "data", cache / "datasets")
    pair_columns(config, rows.column_names, "data")
    options = {"format": "pairs", "max_length": config.max_length,
               "columns": [config.prompt_column, config.chosen_column, config.rejected_column]}
    encode = pair_encoder(config, tokenizer)
    train, key, hit = cached_tokenize(rows, fingerprint, tokenizer, options, encode,
                                      cache / "tokenized", ctx.log)
    evaluation = None
    if config.eval_data:
        eval_rows, eval_fp = load_rows(config.eval_data, "eval_data", cache / "datasets")
        pair_columns(config, eval_rows.column_names, "eval_data")
        evaluation, _, _ = cached_tokenize(eval_rows, eval_fp, tokenizer, options, encode,
                                           cache / "tokenized", ctx.log)
    elif config.eval_fraction:
        split = train.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train, evaluation = split["train"], split["test"]
    # lengths and pairs without a learned response token from the Arrow columns
    import pyarrow.compute as pc

    table = train.with_format("arrow")[:]
    lengths = pc.max_element_wise(pc.list_value_length(table["chosen_input_ids"]),
                                  pc.list_value_length(table["rejected_input_ids"])).to_pylist()

    def rows_learning(column) -> set:
        learned = pc.not_equal(pc.list_flatten(column), -100)
        return set(pc.unique(pc.filter(pc.list_parent_indices(column), learned)).to_pylist())

    empty = len(train) - len(rows_learning(table["chosen_labels"])
                             & rows_learning(table["rejected_labels"]))
    if empty == len(train):
        raise ValueError(f"data: no pair keeps a response token within max_length "
                         f"{config.max_length}; raise max_length or shorten the prompts")
    info = {"data": config.data, "format": "pairs", "rows": len(train),
            "data_sha256": fingerprint, "tokenized_cache": key, "cache_hit": hit,
            "tokens": sum(lengths), "longest": max(lengths),
            "truncated": sum(1 for n in lengths if n >= config.max_length),
            "pairs_without_response": empty}
    ctx.log(f"data: {len(train)} preference pairs, longest {info['longest']} tokens; "
            f"{info['truncated']} cut at max_length {config.max_length}"
            + (f"; {empty} pairs lost a response to max_length" if empty else "")
            + (f"; eval {len(evaluation)} pairs" if evaluation else ""))
    return train, evaluation, info


def prepare(config, ctx, tokenizer, prepare_sft) -> tuple:
    """The data of any objective: pairs for dpo / orpo, else what `prepare_sft` makes."""
    if config.objective in PAIR_OBJECTIVES:
        return prepare_pairs(config, ctx, tokenizer)
    return prepare_sft(config, ctx, tokenizer)


# ----------------------------------------------------------------------- teacher, reference
def vocabulary_problem(student_tok, teacher_tok) -> Optional[str]:
    """Why two tokenizers cannot be distilled across (None: same vocabulary, same ids)."""
    mine, theirs = student_tok.get_vocab(), teacher_tok.get_vocab()
    if mine == theirs:
        return None
    if len(mine) != len(theirs):
        return f"{len(theirs)} tokens against the student's {len(mine)}"
    differ = sorted((i, t) for t, i in theirs.items() if mine.get(t) != i)[:1]
    return f"token {differ[0][1]!r} has id {differ[0][0]} there but " \
           f"{mine.get(differ[0][1])} in the student" if differ else "different token ids"


class Setup:
    """What run needs for a non-sft objective: the Trainer class, the collator, the extra
    lineage edges and the metadata."""

    def __init__(self, objective, collator, edges: list[dict], meta: dict):
        self.objective, self.collator, self.edges, self.meta = objective, collator, edges, meta

    def trainer(self, base: type) -> type:
        from ops.preference import objective_trainer

        return objective_trainer(base, self.objective)


def setup(config, ctx, ck, model, tokenizer) -> Optional[Setup]:
    """Load the teacher (distill) or reference (dpo) and check it; None for sft."""
    if config.objective == "sft":
        return None
    import torch

    from ops.preference import Objective, PairCollator
    from ops.training import PadCollator

    def on_metrics(step: int, values: dict) -> None:
        for key, value in values.items():
            ctx.metric(key, value, step=step)

    meta: dict = {"objective": config.objective}
    edges: list[dict] = []
    other = None
    vocab = None
    if config.objective == "distill":
        teacher = ctx.open(config.teacher)
        if teacher.kind != "model":
            raise ValueError(f"teacher: {teacher.name} is a {teacher.kind}, not a model")
        problem = vocabulary_problem(tokenizer, teacher.load_tokenizer())
        if problem:
            raise ValueError(f"teacher: {teacher.name} has another tokenizer than checkpoint "
                             f"{ck.name} ({problem}); distillation compares the two models' "
                             f"distributions over the same token ids, so they must share "
                             f"the vocabulary")
        other = teacher.load_model(device=ctx.device, dtype=torch.float32)
        widths = (other.get_output_embeddings().weight.shape[0],
                  model.get_output_embeddings().weight.shape[0])
        if min(widths) < len(tokenizer):
            raise ValueError(f"teacher: output widths {widths} are below the tokenizer's "
                             f"{len(tokenizer)} tokens")
        vocab = min(widths)
        edges.append({"checkpoint": teacher, "role": "teacher"})
        meta.update(teacher={"id": teacher.id, "name": teacher.name},
                    distill_alpha=config.distill_alpha,
                    distill_temperature=config.distill_temperature)
        ctx.log(f"distill: teacher {teacher.name}, T {config.distill_temperature}, "
                f"alpha {config.distill_alpha}")
    elif config.objective == "dpo":
        reference = ctx.open(config.reference) if config.reference else ck
        if reference.kind != "model":
            raise ValueError(f"reference: {reference.name} is a {reference.kind}, not a model")
        if config.reference and vocabulary_problem(tokenizer, reference.load_tokenizer()):
            raise ValueError(f"reference: {reference.name} has another tokenizer than "
                             f"checkpoint {ck.name}; DPO compares their log-probabilities "
                             f"of the same tokens")
        shared_base = reference.id == ck.id and config.method in ADAPTER_METHODS
        if not shared_base:  # an adapter's own base needs no second copy
            other = reference.load_model(device=ctx.device, dtype=torch.float32)
        edges.append({"checkpoint": reference, "role": "reference"})
        meta.update(reference={"id": reference.id, "name": reference.name,
                               "adapter_disabled": shared_base}, beta=config.beta)
        ctx.log(f"dpo: reference {reference.name}"
                + (" (the base, adapter switched off)" if shared_base else "")
                + f", beta {config.beta}")
    else:
        meta["orpo_lambda"] = config.beta
        ctx.log(f"orpo: lambda {config.beta}, no reference model")
    objective = Objective(config.objective, beta=config.beta, alpha=config.distill_alpha,
                          temperature=config.distill_temperature, other=other, vocab=vocab,
                          on_metrics=on_metrics)
    collator = PairCollator(tokenizer.pad_token_id) if config.objective in PAIR_OBJECTIVES \
        else PadCollator(tokenizer.pad_token_id)
    return Setup(objective, collator, edges, meta)


def lineage(base_edge: dict, setup_: Optional[Setup]) -> list[dict]:
    """The parents of a trained checkpoint: its start (base_edge) and the teacher or reference.
    A registry edge is one per parent, so when the teacher or reference is the start itself
    the start's edge takes its role, unless it has one already (an adapter's `base`)."""
    edges = [dict(base_edge)]
    for extra in (setup_.edges if setup_ else []):
        same = next((e for e in edges if e["checkpoint"].id == extra["checkpoint"].id), None)
        if same is None:
            edges.append(dict(extra))
        elif not same.get("role"):
            same["role"] = extra["role"]
    return edges


# ---------------------------------------------------------------------------- preview
def preview_pairs(config, view) -> str:
    """Pair count, columns, token lengths and the first pairs (prompt, chosen, rejected)."""
    from plugins.kit import markup
    from plugins.kit.data import load_rows
    from plugins.kit.trainer import PREVIEW_ROWS, length_table, preview_tokenizer

    rows, _ = load_rows(config.data, "data", view.cache_dir / "datasets")
    pair_columns(config, rows.column_names, "data")
    tokenizer = preview_tokenizer(config, view)
    head = rows.select(range(min(len(rows), PREVIEW_ROWS)))
    encoded = pair_encoder(config.model_copy(update={"max_length": 10 ** 9}), tokenizer)(head[:])
    chosen = [len(x) for x in encoded["chosen_input_ids"]]
    rejected = [len(x) for x in encoded["rejected_input_ids"]]
    out = [f"**{len(rows):,} pairs** · objective **{config.objective}** · columns "
           f"{markup.md(rows.column_names)}",
           "prompt + chosen: " + length_table(chosen, config.max_length),
           "prompt + rejected: " + length_table(rejected, config.max_length), ""]
    for i in range(min(3, len(head))):  # the rows are the member's data: shown verbatim
        row = head[i]
        out += [f"**pair {i}**",
                "prompt: " + markup.md(str(row[config.prompt_column])[:300]),
                "chosen: " + markup.md(str(row[config.chosen_column])[:300]),
                "rejected: " + markup.md(str(row[config.rejected_column])[:300]), ""]
    return "\n".join(out)


def preview_note(config, view, tokenizer) -> str:
    """distill: whether the teacher's tokenizer matches (a line for the preview), else ''."""
    if config.objective != "distill" or not config.teacher:
        return ""
    from transformers import AutoTokenizer

    try:
        teacher = AutoTokenizer.from_pretrained(view.checkpoint_path(config.teacher))
    except Exception as exc:  # a preview reports, it does not fail on the teacher
        return f"teacher: could not read its tokenizer ({str(exc)[:200]})"
    problem = vocabulary_problem(tokenizer, teacher)
    return (f"**teacher: another tokenizer** ({problem}); the job would be refused"
            if problem else "teacher: same tokenizer as checkpoint")
