"""The D-CPT Law: fit how the domain and general losses of continual pre-training depend on
the amount of training and the mixture ratio, and pick the ratio that meets a target.

Reference: "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for Large Language
Models" (Que et al. 2024), https://arxiv.org/abs/2406.01375 . Its preferred
parameterisation of a validation loss is

    L(N, D, r) = E + A / N^alpha + B * r^eta / D^beta + C / (r + eps)^gamma

with N the model size, D the number of continual pre-training tokens and r the share of the
training mixture that is the corpus the loss is measured on: r_d (the domain share) for the
domain loss, r_g = 1 - r_d (the general share) for the general loss, the same form mirrored.

What is fitted here, and why:
- N is fixed (one base checkpoint), so A / N^alpha is a constant and folds into E. The form
  fitted is  L(D, r) = E + B * r^eta * (D / D_ref)^(-beta) + C / (r + eps)^gamma,  six
  parameters (E, B, eta, beta, C, gamma). D is measured in training tokens and divided by
  D_ref (the geometric mean of the grid's D) only so that B has the size of a loss: B_paper
  = B * D_ref^beta.
- eps is held fixed (0.1 unless the caller says otherwise), not fitted: on a grid of nine
  cells a seventh free parameter trades off against C and gamma and is not identified.
- The paper fits with a Huber loss on the residuals; here scipy.optimize.least_squares
  minimises the Huber loss (delta `huber_delta`) of the residuals log(prediction) -
  log(observed), within bounds, from several seeded starts, keeping the best.
- B may be negative for the general loss (`general_bounds`): from a base that has stopped
  improving on its general text, more domain-heavy training makes the general loss rise with
  D (forgetting), which a B >= 0 term, falling with D, cannot draw. The domain loss keeps the
  paper's B >= 0.

Ratios, explicitly: the continue_pretrain plugin's `replay_ratio` is the share of general
(replay) blocks, so the domain law takes r = 1 - replay_ratio and the general law takes
r = replay_ratio. Losses are mean next-token cross-entropies in nats (perplexity = exp).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

PARAMETERS = ("E", "B", "eta", "beta", "C", "gamma")
# (low, high) of each parameter, in PARAMETERS order
DOMAIN_BOUNDS = ((0.0, 20.0), (0.0, 50.0), (0.0, 3.0), (0.0, 3.0), (0.0, 20.0), (0.0, 3.0))
GENERAL_BOUNDS = ((0.0, 20.0), (-50.0, 50.0), (0.0, 3.0), (0.0, 3.0), (0.0, 20.0), (0.0, 3.0))


class LawError(ValueError):
    """A fit or a prediction that cannot be made; the message says what is missing."""


@dataclass(frozen=True)
class Law:
    """One fitted D-CPT law: L(D, r) = E + B r^eta (D/D_ref)^-beta + C / (r + eps)^gamma."""

    E: float
    B: float
    eta: float
    beta: float
    C: float
    gamma: float
    eps: float = 0.1
    d_ref: float = 1.0
    # how well it fits its own points: root mean square of log residuals, largest relative
    # error, and the number of points
    rmse_log: float = 0.0
    max_rel_error: float = 0.0
    points: int = 0
    extra: dict = field(default_factory=dict)

    def params(self) -> np.ndarray:
        return np.array([getattr(self, p) for p in PARAMETERS], dtype=np.float64)

    def __call__(self, d, r) -> np.ndarray:
        """The loss at tokens `d` and share `r` (scalars or arrays that broadcast)."""
        return law_value(self.params(), np.asarray(d, dtype=np.float64),
                         np.asarray(r, dtype=np.float64), self.eps, self.d_ref)

    def as_dict(self) -> dict:
        return asdict(self)


def law_value(p: np.ndarray, d: np.ndarray, r: np.ndarray, eps: float,
              d_ref: float) -> np.ndarray:
    """The law's loss for parameters p = (E, B, eta, beta, C, gamma); float64 arrays."""
    e, b, eta, beta, c, gamma = p
    return e + b * np.power(r, eta) * np.power(d / d_ref, -beta) + \
        c / np.power(r + eps, gamma)


def _check_points(d, r, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, r, loss = (np.asarray(x, dtype=np.float64).ravel() for x in (d, r, loss))
    if not (d.size == r.size == loss.size):
        raise LawError(f"D, r and loss differ in length ({d.size}, {r.size}, {loss.size})")
    if d.size < len(PARAMETERS) + 1:
        raise LawError(f"{d.size} points cannot fit {len(PARAMETERS)} parameters: give at "
                       f"least {len(PARAMETERS) + 1}")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r)) and np.all(np.isfinite(loss))):
        raise LawError("D, r and loss must be finite numbers")
    if np.any(d <= 0):
        raise LawError("every D (training tokens) must be > 0")
    if np.any((r < 0) | (r > 1)):
        raise LawError("every ratio r must lie in [0, 1]")
    if np.any(loss <= 0):
        raise LawError("every loss must be > 0")
    if np.unique(r).size < 2 or np.unique(d).size < 2:
        raise LawError("the points need at least two ratios and two values of D")
    return d, r, loss


def fit_law(d: Sequence[float], r: Sequence[float], loss: Sequence[float], *,
            eps: float = 0.1, bounds: Sequence[tuple[float, float]] = DOMAIN_BOUNDS,
            starts: int = 16, seed: int = 0, huber_delta: float = 1e-3) -> Law:
    """Fit the D-CPT law to points (D tokens, share r, loss): Huber loss of log residuals,
    scipy least_squares (trust region reflective) within `bounds`, from `starts` seeded
    random starts (plus the middle of the box); the lowest cost wins."""
    from scipy.optimize import least_squares

    d, r, loss = _check_points(d, r, loss)
    if not 0 < eps <= 1:
        raise LawError(f"eps must lie in (0, 1], got {eps}")
    if starts < 1:
        raise LawError(f"starts must be >= 1, got {starts}")
    low = np.array([b[0] for b in bounds], dtype=np.float64)
    high = np.array([b[1] for b in bounds], dtype=np.float64)
    d_ref = float(np.exp(np.mean(np.log(d))))
    log_loss = np.log(loss)

    def residuals(p):
        pred = law_value(p, d, r, eps, d_ref)
        return np.log(np.maximum(pred, 1e-9)) - log_loss

    rng = np.random.default_rng(seed)
    # starts: the box's middle (E near the smallest loss) and seeded draws inside the box
    # (magnitudes E, B, C drawn on the scale of the losses, exponents over their range)
    scale = float(loss.min())
    first = np.clip(np.array([0.8 * scale, 0.1 * scale, 0.5, 0.5, 0.1 * scale, 0.5]),
                    low, high)
    guesses = [first]
    for _ in range(starts - 1):
        g = np.array([rng.uniform(0, scale), rng.uniform(-scale, scale),
                      rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0, scale),
                      rng.uniform(0, 2)])
        guesses.append(np.clip(g, low + 1e-9, high - 1e-9))
    best = None
    for g in guesses:
        try:
            fit = least_squares(residuals, g, bounds=(low, high), loss="huber",
                                f_scale=huber_delta, x_scale="jac", max_nfev=4000)
        except (ValueError, FloatingPointError):
            continue
        if best is None or fit.cost < best.cost:
            best = fit
    if best is None:
        raise LawError("no start converged")
    pred = law_value(best.x, d, r, eps, d_ref)
    rel = np.abs(pred - loss) / loss
    return Law(*[float(v) for v in best.x], eps=eps, d_ref=d_ref,
               rmse_log=float(np.sqrt(np.mean(np.square(np.log(pred) - log_loss)))),
               max_rel_error=float(rel.max()), points=int(d.size))


@dataclass(frozen=True)
class Prediction:
    """The replay ratio a target asks for, and what the laws predict there."""

    replay_ratio: float
    domain_loss: float
    general_loss: float
    feasible: bool
    general_limit: Optional[float]  # the general loss the target allows (None: no limit)
    domain_limit: Optional[float]   # the domain loss the target asks for (None: no limit)
    tokens: float

    def as_dict(self) -> dict:
        return asdict(self)


def predict_ratio(domain: Law, general: Law, tokens: float, *,
                  objective: str = "domain_within_general_budget",
                  base_general_loss: Optional[float] = None,
                  max_general_ppl_increase: float = 0.05,
                  domain_ppl_target: Optional[float] = None,
                  low: float = 0.0, high: float = 0.9, resolution: float = 0.005) -> Prediction:
    """The replay ratio (general share) in [low, high], on a grid of `resolution`, meeting:

    - "domain_within_general_budget": the lowest predicted domain loss among ratios whose
      predicted general perplexity is at most (1 + max_general_ppl_increase) times the
      base's, i.e. general loss <= base_general_loss + ln(1 + max_general_ppl_increase);
    - "general_within_domain_target": the lowest predicted general loss among ratios whose
      predicted domain perplexity is at most domain_ppl_target.

    When no ratio meets the constraint, `feasible` is False and the ratio is the one that
    comes closest (lowest general loss, or lowest domain loss)."""
    if not 0 <= low < high <= 1:
        raise LawError(f"the ratio range must satisfy 0 <= low < high <= 1, got [{low}, "
                       f"{high}]")
    if not tokens > 0:
        raise LawError(f"tokens must be > 0, got {tokens}")
    n = max(2, int(round((high - low) / resolution)) + 1)
    replay = np.linspace(low, high, n)
    dom = domain(tokens, 1.0 - replay)
    gen = general(tokens, replay)
    general_limit = domain_limit = None
    if objective == "domain_within_general_budget":
        if base_general_loss is None or not math.isfinite(base_general_loss):
            raise LawError("domain_within_general_budget needs the base's general loss")
        if not max_general_ppl_increase >= 0:
            raise LawError(f"max_general_ppl_increase must be >= 0, got "
                           f"{max_general_ppl_increase}")
        general_limit = base_general_loss + math.log1p(max_general_ppl_increase)
        ok = gen <= general_limit
        pick = int(np.argmin(np.where(ok, dom, np.inf))) if ok.any() else int(np.argmin(gen))
    elif objective == "general_within_domain_target":
        if domain_ppl_target is None or not domain_ppl_target > 1:
            raise LawError("general_within_domain_target needs domain_ppl_target > 1")
        domain_limit = math.log(domain_ppl_target)
        ok = dom <= domain_limit
        pick = int(np.argmin(np.where(ok, gen, np.inf))) if ok.any() else int(np.argmin(dom))
    else:
        raise LawError(f"objective {objective!r} is not one of domain_within_general_budget, "
                       f"general_within_domain_target")
    return Prediction(replay_ratio=round(float(replay[pick]), 6),
                      domain_loss=float(dom[pick]), general_loss=float(gen[pick]),
                      feasible=bool(ok.any()), general_limit=general_limit,
                      domain_limit=domain_limit, tokens=float(tokens))
