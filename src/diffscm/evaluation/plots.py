"""The figures of the commands: grids of counterfactuals, and the PNG plots of `diffscm evaluate` (the guidance-scale
sweep and the abduction cost curve)."""

from pathlib import Path

import matplotlib
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import make_image_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_guidance_sweep(sweep: dict, path: Path):
    """Effectiveness and distance to the factual against the guidance scale, with the knee marked."""
    entries = sorted(sweep["scales"].values(), key=lambda entry: entry["guidance_scale"])
    figure, left = plt.subplots(figsize=(5.5, 3.5))
    scales = [entry["guidance_scale"] for entry in entries]
    left.plot(scales, [entry["flip_rate"] for entry in entries], "o-", color="tab:blue")
    left.set_xlabel("guidance scale s")
    left.set_ylabel("oracle flip rate", color="tab:blue")
    right = left.twinx()
    right.plot(scales, [entry["l1_grey_levels_to_factual"] for entry in entries], "s--", color="tab:red")
    right.set_ylabel("L1 to factual (grey levels)", color="tab:red")
    left.axvline(sweep["knee"], color="grey", linestyle=":", label="knee")
    left.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_abduction_curve(curve: list[dict], path: Path):
    """Null-intervention L1 against UNet evaluations per round trip, one line per refinement count."""
    figure, axes = plt.subplots(figsize=(5.5, 3.5))
    for refinement in sorted({point["abduction_refinement_steps"] for point in curve}):
        points = sorted(
            (p["nfe_round_trip"], p["l1_grey_levels"]) for p in curve if p["abduction_refinement_steps"] == refinement
        )
        axes.plot(*zip(*points, strict=True), "o-", label=f"K = {refinement} refinement pass(es)")
    axes.set_xlabel("UNet evaluations per round trip")
    axes.set_ylabel("null-intervention L1 (grey levels)")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def image_grid(columns: torch.Tensor, headers: list[str], scale: int = 3) -> PIL.Image.Image:
    """Rows of images in [0, 1] `(rows, cols, C, H, W)`, each upscaled `scale` times, under a header row."""
    rows, cols, channels, height, width = columns.shape
    pixels = (columns.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    cells = [
        PIL.Image.fromarray(cell.squeeze(-1) if channels == 1 else cell).resize((width * scale, height * scale), 0)
        for cell in pixels.reshape(rows * cols, height, width, channels)
    ]
    body = make_image_grid(cells, rows=rows, cols=cols)
    grid = PIL.Image.new("RGB", (body.width, body.height + 14), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, text in enumerate(headers):
        draw.text((c * width * scale + 2, 1), text, fill="black")
    grid.paste(body.convert("RGB"), (0, 14))
    return grid
