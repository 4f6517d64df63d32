"""Plots a person would rather look at than read."""

import matplotlib

matplotlib.use("Agg")  # files only: runs on servers with no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_success_curves(curves: dict, path: str, title: str = "Success rate against reward evaluations",
                        baseline: float | None = None):
    r"""
    One line per method: success rate (log scale) against NRE, with the 95% interval (or seed spread) as a band.

    Args:
        curves (`dict[str, list[dict]]`): per method, points with `nre`, `rate`, `low`, `high`.
        baseline (`float`, *optional*): the pretrained sampler's rate, drawn as a dashed line.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p["nre"])
        x = [p["nre"] for p in points]
        line, = ax.plot(x, [max(p["rate"], 1e-6) for p in points], marker="o", ms=3, label=name)
        ax.fill_between(x, [max(p["low"], 1e-6) for p in points], [max(p["high"], 1e-6) for p in points],
                        color=line.get_color(), alpha=0.2)
    if baseline is not None:
        ax.axhline(max(baseline, 1e-6), color="grey", ls="--", label="pretrained")
    ax.set_yscale("log")
    ax.set_xlabel("reward evaluations (NRE)")
    ax.set_ylabel("success rate (log scale; floor 1e-6)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
