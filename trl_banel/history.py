"""One entry of `trainer.history` per round, and the round's metrics to log.

An entry is what the console line, `rounds.jsonl` and the run report read: the budget spent, the successes, and the
mechanism step by step (what the filter rejected and why, what the generator proposes, how the failure fit went).
"""

import math


def round_record(round: int, ledger, stats, rewards: list, threshold: float, fit: dict, num_models: int,
                 evidence: bool, spent: int, places: int) -> dict:
    """The history entry of a round: its filter counts `stats` (summed over processes), the rewards of what it
    evaluated, the failure fit's metrics `fit`, the number of failure models after it, and the new evaluations
    `spent` of its `places`."""
    n_success = sum(1 for r in rewards if r is not None and r > threshold)
    evaluated = sum(1 for r in rewards if r is not None)
    proposed, fresh = max(stats.proposed, 1), max(stats.proposed - stats.known, 1)
    if evidence:
        fit = {**fit, "generator/tried_prefix_share": stats.tried_prefix / proposed}
    return {
        "round": round, "nre": ledger.spent, "successes": len(ledger.successes),
        "proposed": stats.proposed, "accepted": stats.accepted, "ratio_rejected": stats.ratio_rejected,
        "known_rejected": stats.known, "known_successes_skipped": stats.known_successes,
        "acceptance_rate": stats.accepted / proposed,
        "round_successes": n_success, "round_evaluated": evaluated, "places": places, "new_evaluations": spent,
        # the proposals sized to the places: a share near 1 means every place bought a new evaluation
        "round/places_filled": spent / max(places, 1),
        # the mechanism, step by step: what the filter rejected and why, what the generator proposes
        "filter/ratio_rejected_rate": stats.ratio_rejected_fresh / fresh,
        "filter/off_support_rate": stats.off_support / fresh,
        "generator/entropy": stats.nll / max(stats.tokens, 1),
        "generator/distinct": stats.distinct / proposed,
        **fit,
        "failure/num_models": num_models,
    }


def metric_means(metrics: dict[str, list]) -> dict[str, float]:
    """The mean of each metric's values since the last log (missing and NaN values left out)."""
    means = {}
    for key, values in metrics.items():
        valid = [v for v in values if v is not None and not math.isnan(v)]
        if valid:
            means[key] = sum(valid) / len(valid)
    return means


def log_round(metrics: dict, record: dict, stats, log_ratios: list[float], spent: int, ledger):
    """Append the round's metrics (`filter/*`, `nre/round`, `success_rate/*` and the record's own) to `metrics`."""
    proposed, evaluated = max(stats.proposed, 1), record["round_evaluated"]
    metrics["filter/acceptance_rate"].append(record["acceptance_rate"])
    metrics["filter/known_failure_rate"].append(stats.known / proposed)
    metrics["filter/known_success_skipped_rate"].append(stats.known_successes / proposed)
    metrics["filter/log_ratio_accepted"].append(log_ratios[0])
    metrics["filter/log_ratio_rejected"].append(log_ratios[1])
    metrics["nre/round"].append(spent)
    metrics["success_rate/evaluated"].append(record["round_successes"] / evaluated if evaluated else float("nan"))
    metrics["success_rate/all_evaluated"].append(
        len(ledger.successes) / ledger.spent if ledger.spent else float("nan"))
    for key, value in record.items():
        if "/" in key and isinstance(value, (int, float)):
            metrics[key].append(value)
