"""peft tuners beyond LoRA/DoRA for the train plugin: AdaLoRA and MiSS, and the GaLore
optimizer's Trainer settings.

- AdaLoRA: "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al.,
  2023), https://arxiv.org/abs/2303.10512 . Each update is P Λ Q in SVD form (peft's
  lora_A = Q, lora_E = Λ, lora_B = P); singular values are pruned by an importance score
  (sensitivity × uncertainty, smoothed) so that the total rank falls on a cubic schedule from
  init_r per matrix to the budget target_r × (number of adapted matrices), unevenly spread.
  peft's `update_and_allocate` must run after every backward pass, before the gradients are
  zeroed: `adalora_callback` calls it from the Trainer's on_optimizer_step.
- MiSS: "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (Kang &
  Yin; formerly Bone, "Block-Affine Adaptation"), https://arxiv.org/abs/2409.15371 : one
  shared r × out_features shard per matrix; peft's `MissConfig` (`BoneConfig` before peft
  0.17).
- GaLore: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et
  al., 2024), https://arxiv.org/abs/2403.03507 : the gradient G (m × n) of each projected
  matrix is projected to r × n (or m × r) with the top singular vectors of G, refreshed every
  update_proj_gap steps; Adam's moments live in the projected space. Through transformers'
  built-in support (`optim="galore_adamw"`, package galore-torch).
"""

from __future__ import annotations

from torch import nn


class AdapterError(ValueError):
    """An adapter setting that does not fit the model; names the setting."""


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def _check_targets(model, targets: list[str], field: str) -> None:
    present = _linear_names(model)
    absent = [t for t in targets if t not in present]
    if absent:
        raise AdapterError(f"{field} {absent} are not linear layers of this model (it has "
                           f"{sorted(present)})")


def adalora_wrap(model, *, init_r: int, target_r: int, alpha: int, target_modules: list[str],
                 total_step: int, tinit: int, tfinal: int, delta_t: int):
    """peft's AdaLoRA: init_r singular values per matrix, pruned to target_r on average.
    total_step, tinit and tfinal are optimizer steps (the budget falls between tinit and
    total_step - tfinal; the final ranks are fixed at step total_step - tfinal)."""
    from peft import AdaLoraConfig, get_peft_model

    _check_targets(model, target_modules, "adapter_modules")
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha,
                           target_modules=list(target_modules), total_step=total_step,
                           tinit=tinit, tfinal=tfinal, deltaT=delta_t, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adalora_schedule(total_step: int, tinit_fraction: float, tfinal_fraction: float) -> tuple:
    """(tinit, tfinal) in steps from fractions of the run; tfinal is at least 1, so that the
    final allocation (at step total_step - tfinal, counting from 0) happens inside the run."""
    tinit = int(tinit_fraction * total_step)
    tfinal = max(1, int(tfinal_fraction * total_step))
    if tinit >= total_step - tfinal:
        raise AdapterError(f"adalora_tinit and adalora_tfinal leave no step of {total_step} for "
                           f"the rank budget to fall ({tinit} warm-up, {tfinal} final steps); "
                           f"train more steps or lower them")
    return tinit, tfinal


def adalora_ranks(model) -> dict[str, int]:
    """The rank each adapted matrix keeps: its non-zero singular values (lora_E entries
    the allocator has not masked), by module name."""
    ranks = {}
    for name, p in model.named_parameters():
        if ".lora_E." in name:
            module = name.split(".lora_E.")[0].removeprefix("base_model.model.")
            ranks[module] = int((p.detach() != 0).sum())
    return ranks


def adalora_callback(model, on_schedule=None):
    """A TrainerCallback that runs AdaLoRA's budget allocation after each optimizer step
    (gradients still there) and, when training begins, sets its schedule to the Trainer's
    real step count: `on_schedule(total_steps) -> (tinit, tfinal)`."""
    from transformers import TrainerCallback

    class AdaLoraAllocation(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            config = model.peft_config[model.active_adapter]
            if on_schedule is not None:
                config.tinit, config.tfinal = on_schedule(state.max_steps)
            config.total_step = state.max_steps

        def on_optimizer_step(self, args, state, control, **kw):
            model.base_model.update_and_allocate(state.global_step)

    return AdaLoraAllocation()


def miss_wrap(model, *, r: int, target_modules: list[str]):
    """peft's MiSS (balance initialisation: the shard starts at zero, so the wrapped model
    computes the base model's function)."""
    from peft import MissConfig, get_peft_model

    _check_targets(model, target_modules, "adapter_modules")
    narrow = min(m.in_features for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)
    if r > narrow:
        raise AdapterError(f"miss_r ({r}) must be at most the in_features of every adapted "
                           f"layer (the narrowest has {narrow})")
    return get_peft_model(model, MissConfig(r=r, target_modules=list(target_modules),
                                            task_type="CAUSAL_LM"))


def galore_arguments(*, rank: int, update_proj_gap: int, scale: float,
                     target_modules: list[str]) -> dict:
    """TrainingArguments settings for transformers' GaLore AdamW on the named linear layers
    (the other parameters get plain AdamW)."""
    return {"optim": "galore_adamw", "optim_target_modules": list(target_modules),
            "optim_args": f"rank={rank},update_proj_gap={update_proj_gap},scale={scale},"
                          f"proj_type=std"}
