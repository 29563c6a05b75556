"""What a training run leaves beside its weights: training.json (options, losses, times) and training.png."""

from __future__ import annotations

import json
from pathlib import Path

from train.heldout import Heldout
from train.loop import Curve


def write_training_report(
    out: Path, record: dict, curves: dict[str, Curve], heldout: Heldout | None = None
) -> None:
    """`record` goes to out/training.json as it is; each curve becomes one panel of out/training.png, and
    the held-out probes one more (each task's loss against its chance level, dashed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = len(curves) + (heldout is not None)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    for axis, (name, curve) in zip(axes[0], curves.items()):
        axis.plot(curve.losses, color="0.8", linewidth=0.6, label="per step")
        axis.plot(curve.smoothed(), color="C0", linewidth=1.5, label="mean of 50 steps")
        axis.set(title=name, xlabel="step", ylabel="loss (target tokens)", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
    if heldout is not None:
        axis = axes[0][-1]
        for index, (name, chance) in enumerate(heldout.chance.items()):
            color = f"C{index}"
            axis.plot(heldout.steps, [losses[name] for losses in heldout.losses], color=color, label=name)
            axis.axhline(chance, color=color, linestyle="--", linewidth=0.8)
        axis.set(
            title="held out: the answer-carrying token", xlabel="step", ylabel="loss (nats); dashed: chance"
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "training.png", dpi=110)
    plt.close(figure)
