"""The train methods and optimizer added in issue 23: mezo (zeroth-order, plugins/train/mezo.py),
adalora and miss (peft tuners), and the galore_adamw optimizer (ops/peft_methods.py).

The Config declares each field in one line with the types below (their descriptions and form
hints live here); run() calls the hooks below at three points: wrapping the model, the
Trainer's arguments, and building the Trainer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from plugins import ADVANCED, LOG_SCALE, for_methods, form_hints

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKPROP_FULL = ("full", "freeze", "hft")  # methods whose weights an optimizer updates directly
NEW_ADAPTERS = ("adalora", "miss")

Optimizer = Annotated[Literal["adamw", "galore_adamw"], Field(description=(
    "full/freeze/hft: adamw, or galore_adamw: GaLore (gradient low-rank projection, Zhao et "
    "al. 2024) on galore_target_modules: their Adam state is rank x n instead of m x n. "
    "Needs the galore-torch package."),
    json_schema_extra=for_methods(*BACKPROP_FULL))]
GaloreRank = Annotated[int, Field(ge=1, le=65_536, description=(
    "galore_adamw: rank r of the projected gradients (the paper: 128 to 512 for 60M to 1B "
    "models; at most the smaller side of a matrix is useful)."),
    json_schema_extra=form_hints(for_methods(*BACKPROP_FULL), ADVANCED))]
GaloreGap = Annotated[int, Field(ge=1, le=1_000_000, description=(
    "galore_adamw: steps between refreshes of the projection (an SVD of the gradient)."),
    json_schema_extra=form_hints(for_methods(*BACKPROP_FULL), ADVANCED))]
GaloreScale = Annotated[float, Field(gt=0, le=100, description=(
    "galore_adamw: scale alpha of the projected-back update (the paper: 0.25)."),
    json_schema_extra=form_hints(for_methods(*BACKPROP_FULL), ADVANCED))]
GaloreTargets = Annotated[list[str], Field(min_length=1, description=(
    "galore_adamw: linear layers whose weights get GaLore (matched by name); the others get "
    "plain AdamW."),
    json_schema_extra=form_hints(for_methods(*BACKPROP_FULL), ADVANCED))]

MezoEps = Annotated[float, Field(gt=0, le=1, description=(
    "mezo: perturbation scale epsilon of the two-point gradient estimate (the paper: 1e-3). "
    "Set learning_rate far below a backprop run's (the paper: 1e-7 to 1e-6 for full "
    "fine-tuning of OPT models)."),
    json_schema_extra=form_hints(for_methods("mezo"), LOG_SCALE))]
MezoSamples = Annotated[int, Field(ge=1, le=64, description=(
    "mezo: random directions per step, their estimates averaged (n-SPSA; 2 forward passes "
    "each). The paper uses 1."),
    json_schema_extra=form_hints(for_methods("mezo"), ADVANCED))]

AdaloraInitR = Annotated[int, Field(ge=1, le=1024, description=(
    "adalora: initial rank of every adapted matrix (the paper's b(0)/n: 1.5 x target_r)."),
    json_schema_extra=for_methods("adalora"))]
AdaloraTargetR = Annotated[int, Field(ge=1, le=1024, description=(
    "adalora: average final rank; the total budget is target_r x the number of adapted "
    "matrices, spread unevenly by importance."),
    json_schema_extra=for_methods("adalora"))]
AdaloraAlpha = Annotated[int, Field(ge=1, le=100_000, description=(
    "adalora: scaling alpha of the update (divided by the matrix's current rank)."),
    json_schema_extra=form_hints(for_methods("adalora"), ADVANCED))]
AdaloraTinit = Annotated[float, Field(ge=0, lt=1, description=(
    "adalora: fraction of the steps trained at init_r before ranks are pruned."),
    json_schema_extra=form_hints(for_methods("adalora"), ADVANCED))]
AdaloraTfinal = Annotated[float, Field(ge=0, lt=1, description=(
    "adalora: fraction of the steps trained at the final ranks (at least one step)."),
    json_schema_extra=form_hints(for_methods("adalora"), ADVANCED))]
AdaloraDeltaT = Annotated[int, Field(ge=1, le=1_000_000, description=(
    "adalora: steps between two budget allocations while the budget falls."),
    json_schema_extra=form_hints(for_methods("adalora"), ADVANCED))]
MissR = Annotated[int, Field(ge=1, le=65_536, description=(
    "miss: rows r of the shared shard (r x out_features per matrix); at most the in_features "
    "of every adapted layer, best even."),
    json_schema_extra=for_methods("miss"))]
AdapterModules = Annotated[list[str], Field(min_length=1, description=(
    "adalora/miss: linear layers that get adapters."),
    json_schema_extra=form_hints(for_methods(*NEW_ADAPTERS), ADVANCED))]


def method_problem(config) -> str | None:
    """What is wrong with the new methods' settings in a train config, if anything."""
    if config.optimizer != "adamw" and config.method not in BACKPROP_FULL:
        return (f"optimizer {config.optimizer} applies to methods {', '.join(BACKPROP_FULL)}, "
                f"not {config.method}")
    if config.optimizer == "galore_adamw" and config.distributed == "fsdp" and config.gpus > 1:
        return "optimizer galore_adamw runs with distributed ddp, not fsdp"
    if config.method == "mezo":
        if config.gpus > 1 or config.cpu_processes > 1:
            return "method mezo runs as one process: set gpus and cpu_processes to 1"
        if config.gradient_accumulation > 1:
            return ("method mezo takes one zeroth-order step per batch: set "
                    "gradient_accumulation to 1 (raise batch_size instead)")
    if config.method == "adalora":
        if config.adalora_target_r > config.adalora_init_r:
            return (f"adalora_target_r ({config.adalora_target_r}) must not exceed "
                    f"adalora_init_r ({config.adalora_init_r})")
        if config.adalora_tinit + config.adalora_tfinal >= 1:
            return "adalora_tinit + adalora_tfinal must be below 1 (the budget needs steps to fall)"
        if config.max_steps:
            from ops.peft_methods import AdapterError, adalora_schedule

            try:
                adalora_schedule(config.max_steps, config.adalora_tinit, config.adalora_tfinal)
            except AdapterError as e:
                return str(e)
    return None


def wrap_model(config, model, meta: dict):
    """The model with the method's adapter (adalora, miss); others unchanged."""
    from ops import peft_methods as P

    if config.method == "adalora":
        provisional = config.max_steps or 1_000_000  # made exact at train begin
        tinit, tfinal = P.adalora_schedule(provisional, config.adalora_tinit,
                                           config.adalora_tfinal)
        return P.adalora_wrap(model, init_r=config.adalora_init_r,
                              target_r=config.adalora_target_r, alpha=config.adalora_alpha,
                              target_modules=config.adapter_modules, total_step=provisional,
                              tinit=tinit, tfinal=tfinal, delta_t=config.adalora_delta_t)
    if config.method == "miss":
        return P.miss_wrap(model, r=config.miss_r, target_modules=config.adapter_modules)
    return model


def training_arguments(config) -> dict:
    """Extra TrainingArguments of the method or optimizer."""
    if config.method == "mezo":
        return {"max_grad_norm": 0.0}  # there are no gradients to clip
    if config.optimizer == "galore_adamw":
        import importlib.util

        if importlib.util.find_spec("galore_torch") is None:
            raise ValueError("optimizer: galore_adamw needs the galore-torch package "
                             "(pip install galore-torch)")
        from ops.peft_methods import galore_arguments

        return galore_arguments(rank=config.galore_rank,
                                update_proj_gap=config.galore_update_proj_gap,
                                scale=config.galore_scale,
                                target_modules=config.galore_target_modules)
    return {}


def trainer_class(config, base):
    """The Trainer class for the method: MeZO's step for mezo; AdaLoRA's budget allocation
    as a callback for adalora; else `base` itself."""
    if config.method == "mezo":
        from plugins.train.mezo import mezo_trainer_class

        return mezo_trainer_class(base, eps=config.mezo_eps, samples=config.mezo_samples,
                                  seed=config.seed)
    if config.method == "adalora":
        from ops.peft_methods import adalora_callback, adalora_schedule

        def schedule(total: int) -> tuple:
            return adalora_schedule(total, config.adalora_tinit, config.adalora_tfinal)

        class AdaLoraTrainer(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(adalora_callback(self.model, schedule))

        return AdaLoraTrainer
    return base


def record(config, model, meta: dict) -> None:
    """What the method adds to the checkpoint's metadata once trained."""
    if config.method == "adalora":
        from ops.peft_methods import adalora_ranks

        ranks = adalora_ranks(model)
        meta["adalora_ranks"] = ranks
        meta["adalora_budget"] = config.adalora_target_r * len(ranks)
        meta["adalora_total_rank"] = sum(ranks.values())
    if config.method == "mezo":
        meta["mezo"] = {"eps": config.mezo_eps, "samples": config.mezo_samples}
    if config.optimizer == "galore_adamw":
        meta["optimizer"] = {"name": "galore_adamw", "rank": config.galore_rank,
                             "update_proj_gap": config.galore_update_proj_gap,
                             "scale": config.galore_scale,
                             "target_modules": config.galore_target_modules}
