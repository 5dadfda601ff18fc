"""Training objectives beyond next-token prediction, for the train plugin: knowledge
distillation from a teacher, and preference tuning on (prompt, chosen, rejected) pairs with DPO
or ORPO. Each is a loss over the logits of a causal LM, plugged into transformers' Trainer by
overriding `compute_loss`, so the optimizer, schedule, gradient accumulation, resume and the
data-parallel launch stay the Trainer's.

References:
- Distillation: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
  https://arxiv.org/abs/1503.02531 : KL(teacher || student) between the softmaxes at
  temperature T, multiplied by T^2 so that its gradients keep their size as T changes, mixed
  with the ordinary loss on the labels.
- DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model", https://arxiv.org/abs/2305.18290 , eq. 7:
  L = -log sigma(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
  log-probabilities summed over the response tokens.
- ORPO: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", https://arxiv.org/abs/2403.07691 , eqs. 4-7: L = L_SFT(y_w) + lambda * L_OR with
  L_OR = -log sigma(log odds(y_w|x) - log odds(y_l|x)), odds(y|x) = P / (1 - P) where
  log P = the mean log-probability of the response tokens.

Why not TRL (trl 1.16.0 installs next to the pinned transformers 5.23.0 / peft 0.21.2 /
accelerate 1.15.0 without changing them): its ORPOTrainer lives in `trl.experimental` (no API
promise), and its DPOTrainer tokenizes and collates the data itself, which would bypass the lab's
tokenization cache, the prompt masking `train` uses for every other objective and the
intermediate-checkpoint / resume callbacks. The losses are a few lines each; they are written
here on the Trainer the plugin already drives.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ops.training import IGNORE, encode_prompt_completion_batch


# ----------------------------------------------------------------------------- encoding
def encode_pairs_batch(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str],
                       max_length: int) -> dict:
    """Each pair as two prompt + response sequences (response + EOS learned, prompt masked),
    cut on the right at max_length: {chosen_input_ids, chosen_labels, rejected_input_ids,
    rejected_labels}."""
    good = encode_prompt_completion_batch(tokenizer, prompts, chosen, True, max_length)
    bad = encode_prompt_completion_batch(tokenizer, prompts, rejected, True, max_length)
    return {"chosen_input_ids": good["input_ids"], "chosen_labels": good["labels"],
            "rejected_input_ids": bad["input_ids"], "rejected_labels": bad["labels"]}


class PairCollator:
    """Pads a list of encoded pairs into one batch of 2B rows: the B chosen sequences, then the
    B rejected ones (right padding), so that one forward pass scores both."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows] + \
               [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)  # (2B, L)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (x, y) in enumerate(seqs):
            ids[i, :len(x)] = torch.as_tensor(x)
            labels[i, :len(y)] = torch.as_tensor(y)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------- losses
def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels (shifted: position t predicts token t+1) and
    the mask of the tokens that count. logits (B, L, V), labels (B, L) -> two (B, L-1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2,
                          labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """(sum of the response's token log-probabilities, its token count), each (B,)."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict]:
    """DPO's sigmoid loss from summed sequence log-probabilities (each (B,)); with the
    log-ratio margin [(pi_w - ref_w) - (pi_l - ref_l)] and the implicit rewards as metrics."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    loss = -F.logsigmoid(beta * margin).mean()
    return loss, {"logratio_margin": margin.mean(), "reward_chosen": beta * chosen_ratio.mean(),
                  "reward_rejected": beta * rejected_ratio.mean(),
                  "reward_accuracy": (margin > 0).float().mean()}


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P (< 0), computed stably: log P - log(1 - exp(log P))."""
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo_loss(chosen_sum: torch.Tensor, chosen_count: torch.Tensor,
              rejected_sum: torch.Tensor, rejected_count: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, dict]:
    """ORPO: the chosen responses' NLL (mean per token) plus lambda times the odds-ratio loss;
    P of a response is its mean token probability (the paper's length normalisation)."""
    chosen_mean = chosen_sum / chosen_count.clamp(min=1)
    rejected_mean = rejected_sum / rejected_count.clamp(min=1)
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    odds_loss = -F.logsigmoid(ratio).mean()
    nll = -(chosen_sum.sum() / chosen_count.sum().clamp(min=1))
    return nll + lam * odds_loss, {"log_odds_ratio": ratio.mean(), "odds_ratio_loss": odds_loss,
                                   "chosen_nll": nll,
                                   "logratio_margin": (chosen_sum - rejected_sum).mean(),
                                   "reward_accuracy": (ratio > 0).float().mean()}


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the tokens that
    have a label (the positions the LM loss learns: prompt tokens masked the same way).
    Exactly 0 when the logits are equal. Logits (B, L, V) with the same V."""
    mask = labels[:, 1:] != IGNORE
    s = student_logits[:, :-1][mask].float() / temperature  # (N, V)
    t = teacher_logits[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    return kl.sum(-1).mean() * temperature ** 2


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (what the model's own loss is)."""
    logps, mask = token_logps(logits, labels)
    return -(logps.sum() / mask.sum().clamp(min=1))


# ------------------------------------------------------------------------------ trainer
class Objective:
    """What a Trainer subclass needs beyond the model: the objective's name and weights, a
    frozen teacher or reference model (or None: the reference of an adapter run is its base,
    the adapter switched off), and where metrics go."""

    def __init__(self, kind: str, *, beta: float = 0.1, alpha: float = 0.5,
                 temperature: float = 2.0, other: Optional[torch.nn.Module] = None,
                 vocab: Optional[int] = None,
                 on_metrics: Optional[Callable[[int, dict], None]] = None):
        if kind not in ("distill", "dpo", "orpo"):
            raise ValueError(f"objective: unknown objective {kind!r}")
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.other = other  # teacher (distill) or reference (dpo); frozen, in eval mode
        self.vocab = vocab  # logit columns compared (distill): the shared vocabulary
        self.on_metrics = on_metrics
        if other is not None:
            other.eval()
            other.requires_grad_(False)

    @torch.no_grad()
    def _other_logits(self, model, inputs: dict) -> torch.Tensor:
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        if self.other is not None:
            return self.other(**batch, use_cache=False).logits
        unwrapped = getattr(model, "module", model)  # DDP
        with unwrapped.disable_adapter():  # a peft model's base: the reference of an adapter
            return unwrapped(**batch, use_cache=False).logits

    def loss(self, model, inputs: dict) -> tuple[torch.Tensor, dict]:
        """(loss to minimise, metrics) for one batch."""
        labels = inputs["labels"]
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       use_cache=False).logits
        if self.kind == "distill":
            teacher = self._other_logits(model, inputs)
            v = self.vocab or min(logits.shape[-1], teacher.shape[-1])
            lm = lm_loss(logits, labels)
            kl = distill_kl(logits[..., :v], teacher[..., :v], labels, self.temperature)
            return self.alpha * kl + (1 - self.alpha) * lm, {"distill_loss": kl, "lm_loss": lm}
        total, count = sequence_logps(logits, labels)
        b = total.shape[0] // 2
        if self.kind == "orpo":
            return orpo_loss(total[:b], count[:b], total[b:], count[b:], self.beta)
        ref_total, _ = sequence_logps(self._other_logits(model, inputs), labels)
        return dpo_loss(total[:b], total[b:], ref_total[:b], ref_total[b:], self.beta)

    def eval_loss(self, model, inputs: dict) -> torch.Tensor:
        """Held-out loss, comparable across objectives: the LM loss on the labelled tokens
        (distill), of the chosen responses (dpo, orpo)."""
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       use_cache=False).logits
        labels = inputs["labels"]
        if self.kind != "distill":
            b = labels.shape[0] // 2
            logits, labels = logits[:b], labels[:b]
        return lm_loss(logits, labels)


def objective_trainer(base: type, objective: Objective) -> type:
    """A subclass of `base` (transformers' Trainer) whose loss is `objective`'s. Metrics are
    averaged over the steps between two logs and go to objective.on_metrics (rank 0's)."""

    class ObjectiveTrainer(base):
        # the loss is a per-batch mean: let the Trainer divide it by the accumulation steps
        loss_is_scaled_for_ga = False

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._sums: dict[str, float] = {}
            self._n = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, metrics = objective.loss(model, inputs)
            if model.training:
                for k, v in metrics.items():
                    self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
                self._n += 1
            return (loss, {}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = objective.eval_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs, *args, **kw):
            if "loss" in logs and self._n:
                extra = {k: v / self._n for k, v in self._sums.items()}
                self._sums, self._n = {}, 0
                logs = {**logs, **extra}
                if objective.on_metrics is not None and self.is_world_process_zero():
                    objective.on_metrics(self.state.global_step, extra)
            return super().log(logs, *args, **kw)

    return ObjectiveTrainer
