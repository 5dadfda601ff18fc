"""Which way is better, for every score an evaluation records: perplexity and losses go down,
accuracies go up. The Compare tab colours a change green or red by it, so a lower perplexity
and a higher accuracy both read as gains.

The table follows lm-eval-harness's own `higher_is_better` declarations (lm_eval/api/
metrics.py: `@register_metric(..., higher_is_better=...)`) for the metrics it ships, and
adds the evaluate plugin's own (nll_per_token, the suite's generation metrics). lm-eval's
registry is not read at run time: importing lm_eval costs seconds and it is an optional
extra, and the app must stay light. When an evaluation records `higher_is_better` in its
details (lm-eval reports it per task and metric in `results["higher_is_better"]`), that
recorded value wins over this table (`direction`).

A metric this table does not know is treated as better higher, and `known` says so, so that
the view can say "direction unknown" rather than colour a guess silently.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping, Optional

Direction = Literal["higher", "lower"]

# Exact metric names (lower case, after the task prefix and the lm-eval filter are removed).
LOWER = frozenset({
    # lm-eval (api/metrics.py)
    "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "brier_score", "ter",
    # the evaluate plugin's perplexity job
    "nll_per_token", "nll", "loss", "eval_loss", "train_loss",
    # error rates
    "wer", "cer", "error", "error_rate", "mae", "mse", "rmse",
})
HIGHER = frozenset({
    # lm-eval (api/metrics.py)
    "acc", "acc_norm", "acc_mutual_info", "acc_bytes", "acc_all", "exact_match", "likelihood",
    "mcc", "f1", "bleu", "chrf", "chrf++", "bypass", "em", "exact", "pass@1", "pass_at_1",
    # the local suite's generation metrics (plugins/evaluate/suites.py)
    "contains", "regex",
    # common in lm-eval's tasks' own metric lists
    "rouge", "rouge1", "rouge2", "rougel", "rougelsum", "bleurt", "bertscore", "meteor",
    "accuracy", "precision", "recall", "macro_f1", "micro_f1", "f1_macro", "f1_micro",
    "prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
    "inst_level_loose_acc", "pass@k", "score", "win_rate",
})
# Families, by the shape of the name, for what the exact sets miss (rouge2_max, acc_stderr
# never reaches here: the evaluate plugin records no stderr rows).
_LOWER_PATTERN = re.compile(r"(perplexity|^ppl$|bits_per_|bpb|loss|^nll|error|_err$|^wer$|"
                            r"^cer$|^ter$)")
_HIGHER_PATTERN = re.compile(r"(^acc|accuracy|exact_match|^em$|^f1|_f1$|^bleu|^rouge|^chrf|"
                             r"^pass@|^mcc|^bertscore|^meteor)")


def base_name(metric: str) -> str:
    """The metric's own name in a score label: `task/acc_norm[strict-match]` -> `acc_norm`
    (the registry's labels are `task/metric`; lm-eval's filters are `[filter]`)."""
    name = str(metric).rsplit("/", 1)[-1]
    name = re.sub(r"\[.*\]$", "", name).strip().lower()
    return name.split(",", 1)[0]  # lm-eval's raw "acc,none" form too


def known(metric: str) -> bool:
    """Whether the table (exactly or by the family of the name) says which way is better."""
    name = base_name(metric)
    return (name in LOWER or name in HIGHER or bool(_LOWER_PATTERN.search(name))
            or bool(_HIGHER_PATTERN.search(name)))


def better(metric: str) -> Direction:
    """"lower" for perplexities, bits per byte, losses and error rates; "higher" for
    accuracies, exact match, contains, regex, F1, BLEU, ROUGE... and for unknown metrics
    (check `known`, and say so where it is shown)."""
    name = base_name(metric)
    if name in LOWER:
        return "lower"
    if name in HIGHER:
        return "higher"
    if _LOWER_PATTERN.search(name) and not _HIGHER_PATTERN.search(name):
        return "lower"
    return "higher"


def recorded(details: Optional[Mapping]) -> Optional[Direction]:
    """The direction an evaluation recorded in its details (`higher_is_better`: true or
    false), or None when it recorded none."""
    if not isinstance(details, Mapping):
        return None
    value = details.get("higher_is_better")
    if isinstance(value, bool):
        return "higher" if value else "lower"
    return None


def direction(metric: str, details: Optional[Mapping] = None) -> tuple[Direction, str]:
    """(direction, source): the direction recorded with the evaluation when there is one
    (source "recorded"), else the table's ("table"), else "higher" with source "unknown"."""
    mine = recorded(details)
    if mine is not None:
        return mine, "recorded"
    if known(metric):
        return better(metric), "table"
    return "higher", "unknown"


def is_gain(delta: float, way: Direction) -> Optional[bool]:
    """True when a change `delta` (new - old) is an improvement for a metric that is better
    `way`, False when it is a loss, None when there is no change."""
    if delta == 0:
        return None
    return (delta > 0) == (way == "higher")


def pareto_front(points: list[tuple[float, float]], x_way: Direction = "higher",
                 y_way: Direction = "higher") -> list[bool]:
    """For each (x, y) point, whether no other point is at least as good on both axes and
    better on one (the Pareto front; `x_way`/`y_way` say which way is better). Sorted sweep,
    O(n log n): equal points are all on the front; a point with a NaN or infinite
    coordinate is never on it and hides no other."""
    import math

    sx = 1.0 if x_way == "higher" else -1.0
    sy = 1.0 if y_way == "higher" else -1.0
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    keyed = sorted(finite, key=lambda i: (-sx * points[i][0], -sy * points[i][1]))
    on = [False] * len(points)
    best_y = float("-inf")  # the best y among points with a strictly better x
    i = 0
    while i < len(keyed):
        j = i  # a run of equal x: compared with the better x only, then among themselves
        while j < len(keyed) and points[keyed[j]][0] == points[keyed[i]][0]:
            j += 1
        run_best = sy * points[keyed[i]][1]  # the run is sorted by y, best first
        for k in keyed[i:j]:
            y = sy * points[k][1]
            on[k] = y > best_y and y == run_best
        best_y = max(best_y, run_best)
        i = j
    return on
