"""Null-intervention L1 (grey levels) of the shipped classifier-guided MNIST pipeline on 8 held-out digits under each
DDIM timestep spacing, at 15 and 30 steps: abduction and prediction walk one chain with one step function, so the
round trip holds whatever the scheduler's spacing.

    python benchmarks/timestep_spacing.py
"""

import torch
from diffusers import DDIMScheduler

from diffscm import DiffSCMPipeline
from diffscm.data import heldout_rows, load_bundled_mnist
from diffscm.paths import shipped_checkpoint
from diffscm.tables import markdown_table


def main():
    folder = shipped_checkpoint("diffscm-mnist")
    base = DiffSCMPipeline.from_pretrained(folder)
    rows = heldout_rows(folder, load_bundled_mnist(), 8)
    images, labels = [row["image"] for row in rows], [row["label"] for row in rows]
    factual = (base.preprocess(images) + 1) / 2
    rows = []
    for spacing in ("leading", "linspace", "trailing"):
        scheduler = DDIMScheduler.from_config(base.scheduler.config, timestep_spacing=spacing)
        pipe = DiffSCMPipeline(
            base.unet, scheduler, base.classifier, guidance_scale=0.0,
            abduction_refinement_steps=base.config.abduction_refinement_steps,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        errors = []
        for steps in (15, 30):
            null = pipe.intervene(pipe.abduct(images, {"label": labels}, num_inference_steps=steps))
            errors.append((null - factual).abs().mean().item() * 255)
        rows.append([spacing, f"{errors[0]:.2f}", f"{errors[1]:.2f}"])
    print(markdown_table(["timestep_spacing", "null L1, 15 steps", "null L1, 30 steps"], rows))


if __name__ == "__main__":
    with torch.no_grad():
        main()
