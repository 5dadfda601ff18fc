"""method mezo: zeroth-order full fine-tuning (MeZO, ops/zeroth_order.py) on transformers'
Trainer.

Why a Trainer subclass: the Trainer already does what the other methods rely on (data order,
the learning-rate schedule, logging to the live metrics, intermediate checkpoints, exact
resume); only its step differs. `training_step` is the Trainer's documented override point
("Subclass and override to inject custom behavior"), and MeZO's own code overrides the same
loop. The step measures the loss at θ + εz and θ - εz under no_grad, restores θ, and moves θ
along z by the learning rate of the Trainer's schedule; it never calls backward, so no
`.grad` exists and the Trainer's optimizer (a stateless SGD that only carries the schedule)
has nothing to do."""

from __future__ import annotations


def mezo_trainer_class(base, *, eps: float, samples: int, seed: int):
    """A subclass of the Trainer class `base` whose step is MeZO's, with `samples` directions
    per step (seeded by the run's seed and the step, so a resumed run draws the same ones)."""
    import torch

    from ops import zeroth_order as Z

    class MeZOTrainer(base):
        def __init__(self, *args, **kwargs):
            model = kwargs["model"]
            carrier = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                      lr=kwargs["args"].learning_rate)
            super().__init__(*args, optimizers=(carrier, None), **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.eval()  # both passes must see the same function: no dropout
            inputs = self._prepare_inputs(inputs)
            params = Z.trainable_parameters(self.model)

            def loss():
                with self.compute_loss_context_manager():
                    return self.compute_loss(model, inputs)

            out = Z.mezo_step(loss, params, Z.step_seeds(seed, self.state.global_step, samples),
                              eps=eps, lr=self._get_learning_rate(),
                              weight_decay=self.args.weight_decay)
            return torch.tensor(out["loss"], device=self.args.device)

    return MeZOTrainer
