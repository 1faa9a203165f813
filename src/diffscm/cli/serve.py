"""`diffscm serve`: a Gradio web demo of the shipped pipelines (also the Space's `app.py`).

Upload or draw a digit, or pick a held-out one; choose the model and the intervention; see the factual, its
reconstruction (the null intervention) and the counterfactuals with the values they were asked for and the anti-causal
predictor's reading; download the grid.
"""

import argparse
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .. import hub
from ..data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from ..options import device_and_dtype
from ..paths import shipped_checkpoint, shipped_data
from .demo import image_grid

DEFAULT_MODELS = {
    "MNIST: digit -> image": "diffscm-mnist-conditional",
    "Morpho-MNIST: thickness -> intensity -> image <- digit": "diffscm-morphomnist-conditional",
}
KEEP = "keep"
MAX_UPLOAD = "5mb"  # a digit is a few KB
MAX_PIXELS = 4096 * 4096  # refused from the header, before decoding: a small PNG can hold 13000 x 13000 pixels
CONCURRENCY = 1  # one request at a time uses every core; the others wait in the queue
QUEUE_SIZE = 32


def add_commands(commands):
    parser = commands.add_parser("serve", help="A web demo (Gradio) on localhost.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--model", nargs="+", default=None, help="Pipeline folders or Hub ids to serve (default: the shipped ones)."
    )
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace):
    models = {Path(model).name or model: model for model in args.model} if args.model else None
    device, _ = device_and_dtype(argparse.Namespace(device=args.device, dtype="float32"))
    app = build_app(models, device)
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)


def limit_image_size():
    """Uploads larger than MAX_PIXELS are refused by PIL from their header, before any pixel is decoded (PIL raises
    its DecompressionBombError past twice MAX_IMAGE_PIXELS)."""
    PIL.Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


class CounterfactualDemo:
    """The demo's logic, apart from its widgets: models by display name, held-out examples, one request."""

    def __init__(self, models: dict[str, str] | None = None, device: str | None = None):
        self.models = {name: path for name, path in (models or _shipped(DEFAULT_MODELS)).items()}
        if not self.models:
            raise FileNotFoundError("No pipeline to serve: none of the shipped checkpoints was found.")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline = cache(self._load)

    def _load(self, name: str):
        pipe = hub.load_pipeline(self.models[name]).to(self.device)
        pipe.set_progress_bar_config(leave=False)
        return pipe

    def is_scm(self, name: str) -> bool:
        return len(self.pipeline(name).causal_graph.image_parents) > 1

    def example(self, name: str, index: int) -> tuple[PIL.Image.Image, dict]:
        """Held-out digit number `index` of the model's split, and its factual values."""
        pipe = self.pipeline(name)
        folder = pipe.config._name_or_path
        if self.is_scm(name):
            rows = heldout_rows(folder, load_image_dataset(train_data_dir=shipped_data("morphomnist")), 1, skip=index)
        else:
            rows = heldout_rows(folder, load_bundled_mnist(), 1, skip=index, source=BUNDLED_MNIST)
        if not rows:
            raise ValueError(f"The model holds out fewer than {index + 1} digits.")
        return rows[0]["image"], {k: v.tolist() for k, v in pipe.causal_graph.data_values(rows).items()}

    @torch.no_grad()
    def counterfactuals(self, name: str, image: PIL.Image.Image, request: dict, factual: dict | None = None):
        """The grid (factual, null intervention, counterfactuals) and a Markdown table of the values."""
        pipe = self.pipeline(name)
        if self.is_scm(name):
            intervention = {k: v for k, v in request.items() if v is not None and v != KEEP}
            if not intervention:
                raise ValueError("Choose at least one intervention.")
            out = pipe(image, intervention=intervention, factual_values=factual, output_type="pt",
                       return_reconstruction=True)  # fmt: skip
            headers = ["factual", "null", "do(" + ", ".join(f"{k}={_show(v)}" for k, v in intervention.items()) + ")"]
        else:
            parent = pipe.single_categorical_parent()
            target = request.get(parent, "all")
            out = pipe(image, target="all" if target == "all" else int(target), factual_values=factual,
                       output_type="pt", return_reconstruction=True)  # fmt: skip
            headers = ["factual", "null"] + [f"do({parent}={t})" for t in out.targets]
        factual_image = (pipe.preprocess(image) + 1) / 2
        columns = torch.cat([factual_image, out.reconstructions, out.images]).cpu()[None]
        grid = image_grid(columns, headers, scale=4)
        return grid, values_table(out, headers[2:])


def values_table(out, headers: list[str]) -> str:
    """The values asked for and the anti-causal predictor's reading of each counterfactual."""
    names = list(out.counterfactual_values)
    lines = [
        "| counterfactual | " + " | ".join(f"asked {n}" for n in names) + " | " + " | ".join(
            f"reads {n}" for n in out.predicted_values) + " |",
        "|---|" + "---:|" * (len(names) + len(out.predicted_values)),
    ]  # fmt: skip
    for i, header in enumerate(headers):
        asked = " | ".join(_show(out.counterfactual_values[n][i]) for n in names)
        read = " | ".join(_show(v[i]) for v in out.predicted_values.values())
        lines.append(f"| {header} | {asked} | {read} |")
    factual = ", ".join(f"{k} {_show(v[0])}" for k, v in out.factual_values.items())
    given = "predicted from the image" if out.predicted_factuals else "given"
    return f"Factual values ({given}): {factual}\n\n" + "\n".join(lines)


def drawn_digit(editor_value) -> PIL.Image.Image | None:
    """A Sketchpad's composite as a grey digit, white on black like MNIST (a dark drawing on white is inverted)."""
    composite = editor_value.get("composite") if isinstance(editor_value, dict) else editor_value
    if composite is None:
        return None
    image = composite if isinstance(composite, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(composite))
    if image.mode in ("RGBA", "LA"):
        background = PIL.Image.new("RGBA", image.size, "white")
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    grey = image.convert("L")
    if np.asarray(grey).mean() > 127:
        grey = PIL.ImageOps.invert(grey)
    if not np.asarray(grey).any():
        return None
    return grey


def build_app(models: dict[str, str] | None = None, device: str | None = None):
    import gradio as gr

    limit_image_size()
    demo = CounterfactualDemo(models, device)
    names = list(demo.models)

    def run(name, upload, drawing, example_values, target, thickness, intensity, digit, progress=gr.Progress(True)):  # noqa: B008
        image = upload if upload is not None else drawn_digit(drawing)
        if image is None:
            raise gr.Error("Upload or draw a digit, or pick a held-out one.")
        factual = example_values if upload is not None and example_values else None
        if demo.is_scm(name):
            request = {"thickness": thickness, "intensity": intensity, "digit": None if digit == KEEP else int(digit)}
        else:
            request = {demo.pipeline(name).single_categorical_parent(): target}
        try:
            grid, table = demo.counterfactuals(name, image, request, factual)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
        path = Path(tempfile.mkdtemp()) / "counterfactuals.png"
        grid.save(path)
        return grid, table, str(path)

    def pick(name, index):
        image, values = demo.example(name, int(index))
        return image, values

    def controls(name):
        scm = demo.is_scm(name)
        return gr.update(visible=not scm), gr.update(visible=scm), gr.update(visible=scm), gr.update(visible=scm)

    with gr.Blocks(title="diffscm: counterfactual images") as app:
        gr.Markdown(
            "# diffscm: counterfactual images with diffusion models\n"
            "What would this digit look like had its digit, stroke thickness or intensity been different? "
            "Abduction inverts the image to its exogenous noise; the intervention runs the causal mechanism back "
            "under the new values (Diff-SCM)."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(names, value=names[0], label="model")
                with gr.Tab("upload"):
                    upload = gr.Image(type="pil", image_mode="L", label="factual image", elem_id="factual")
                with gr.Tab("draw"):
                    drawing = gr.Sketchpad(type="pil", label="draw a digit")
                with gr.Row():
                    index = gr.Number(value=0, precision=0, minimum=0, label="held-out digit #")
                    example = gr.Button("pick a held-out digit", elem_id="pick")
                example_values = gr.State(None)
                target = gr.Dropdown(["all"] + [str(k) for k in range(10)], value="all", label="do(digit = ...)")
                thickness = gr.Slider(0.5, 6.0, value=4.0, step=0.1, label="do(thickness = ...) px", visible=False)
                intensity = gr.Slider(64, 255, value=180, step=1, label="do(intensity = ...)", visible=False)
                digit = gr.Dropdown([KEEP] + [str(k) for k in range(10)], value=KEEP, label="do(digit = ...)",
                                    visible=False)  # fmt: skip
                button = gr.Button("Counterfactuals", variant="primary", elem_id="run")
            with gr.Column():
                grid = gr.Image(type="pil", label="factual | null intervention | counterfactuals", elem_id="grid")
                table = gr.Markdown(elem_id="values")
                download = gr.File(label="download the grid")
        model.change(controls, model, [target, thickness, intensity, digit])
        upload.upload(lambda: None, None, example_values)
        example.click(pick, [model, index], [upload, example_values])
        button.click(run, [model, upload, drawing, example_values, target, thickness, intensity, digit],
                     [grid, table, download])  # fmt: skip
        app.load(controls, model, [target, thickness, intensity, digit])
    return app


def _shipped(models: dict[str, str]) -> dict[str, str]:
    found = {}
    for name, checkpoint in models.items():
        try:
            found[name] = shipped_checkpoint(checkpoint)
        except FileNotFoundError:
            continue
    return found


def _show(value) -> str:
    return f"{value:.2f}" if isinstance(value, float | np.floating) else str(value)
