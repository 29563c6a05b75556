"""What a training run leaves beside its weights: training.json (options, losses, times) and training.png."""

from __future__ import annotations

import json
from pathlib import Path

from train.loop import Curve


def write_training_report(out: Path, record: dict, curves: dict[str, Curve]) -> None:
    """`record` goes to out/training.json as it is; each curve becomes one panel of out/training.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for axis, (name, curve) in zip(axes[0], curves.items()):
        axis.plot(curve.losses, color="0.8", linewidth=0.6, label="per step")
        axis.plot(curve.smoothed(), color="C0", linewidth=1.5, label="mean of 50 steps")
        axis.set(title=name, xlabel="step", ylabel="loss (target tokens)", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "training.png", dpi=110)
    plt.close(figure)
