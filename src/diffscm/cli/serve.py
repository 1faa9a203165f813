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

from .. import hub, morphometrics
from ..data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from ..evaluation import DigitOracle
from ..evaluation.metrics import oracle_predictions
from ..options import device_and_dtype
from ..paths import REPOSITORY, shipped_checkpoint, shipped_data
from ..tables import markdown_table
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
EXAMPLES = [str(path) for path in sorted((REPOSITORY / "docs" / "examples").glob("*.png"))]  # in a checkout
# A 28 px digit is drawn at 224 px, its pixels kept square: the factual must be as easy to see as the counterfactuals.
PAGE_CSS = (
    "#factual img { height: 224px !important; width: auto !important; object-fit: contain !important; "
    "image-rendering: pixelated; }"
)
HOW_IT_WORKS = """
1. **Abduction**: the picture is inverted by deterministic DDIM to its exogenous noise u, the part of the image that
   its causes do not explain (the writer's style).
2. **Action**: do() sets the variables you tick; their descendants follow the causal graph's mechanisms (on
   Morpho-MNIST, thicker strokes are brighter: intensity follows thickness unless you tick it too).
3. **Prediction**: the diffusion model runs from the same u under the new parents.

The null intervention (the parents unchanged) must give the picture back: it shows how exact the abduction is. The
table reads every counterfactual back with judges that never guided it: morphometrics and an independent oracle.
"""


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
    launch(app, server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)


def launch(app, **options):
    """Serve the page of [`build_app`] with its style (Gradio takes the page's CSS at launch)."""
    return app.launch(css=PAGE_CSS, **options)


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
        self._oracle = cache(lambda folder: DigitOracle.from_pretrained(folder).eval().to(self.device))

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

    def oracle(self, name: str):
        """The independent digit oracle of the model's data (never used for guidance)."""
        scm = self.is_scm(name)
        return self._oracle(shipped_checkpoint("morphomnist-oracle" if scm else "mnist-oracle"))

    @torch.no_grad()
    def counterfactuals(self, name: str, image: PIL.Image.Image, request: dict, factual: dict | None = None):
        """The gallery (factual, null intervention, counterfactuals, each captioned), the same as one grid image, and
        a Markdown table: per variable the value asked, the value after propagation through the mechanisms, and the
        value read back from the picture by an independent measurement."""
        pipe = self.pipeline(name)
        if self.is_scm(name):
            intervention = {k: v for k, v in request.items() if v is not None and v != KEEP}
            if not intervention:
                raise ValueError("Tick at least one variable to intervene on.")
            out = pipe(image, intervention=intervention, factual_values=factual, output_type="pt",
                       return_reconstruction=True)  # fmt: skip
            headers = ["do(" + ", ".join(f"{k}={_show(v)}" for k, v in intervention.items()) + ")"]
            asked = [intervention]
        else:
            parent = pipe.single_categorical_parent()
            target = request.get(parent, "all")
            out = pipe(image, target="all" if target == "all" else int(target), factual_values=factual,
                       output_type="pt", return_reconstruction=True)  # fmt: skip
            headers = [f"do({parent}={t})" for t in out.targets]
            asked = [{parent: int(t)} for t in out.targets]
        factual_image = (pipe.preprocess(image) + 1) / 2
        images = torch.cat([factual_image, out.reconstructions, out.images]).cpu()
        captions = ["factual", "null intervention (reconstruction)", *headers]
        gallery = [(_enlarged(picture), caption) for picture, caption in zip(images, captions, strict=True)]
        grid = image_grid(images[None], ["factual", "null", *headers], scale=4)
        readings = read_back(images[2:], self.oracle(name), pipe.causal_graph.image_parents)
        return gallery, grid, values_table(out, headers, asked, readings)


def read_back(images: torch.Tensor, oracle, parents) -> dict[str, np.ndarray]:
    """What an independent measurement reads from each picture in [0, 1]: Morpho-MNIST's morphometrics for
    thickness and intensity, the oracle for the digit (the categorical parent)."""
    readings = {}
    if {"thickness", "intensity"} & set(parents):
        measured = morphometrics.measure(images)
        readings |= {k: measured[k] for k in ("thickness", "intensity") if k in parents}
    categorical = [p for p in parents if p not in readings]
    if categorical:
        readings[categorical[0]] = oracle_predictions(oracle, images).numpy()
    return readings


def values_table(out, headers: list[str], asked: list[dict], readings: dict) -> str:
    """Per counterfactual and variable: asked (or - when left to its mechanism), after propagation, read back."""
    names = list(out.counterfactual_values)
    columns = [f"{n}: asked / after propagation / read back" for n in names]
    rows = []
    for i, header in enumerate(headers):
        cells = []
        for n in names:
            request = asked[min(i, len(asked) - 1)]
            read = _show(readings[n][i]) if n in readings else "-"
            cells.append(
                f"{_show(request[n]) if n in request else '-'} / {_show(out.counterfactual_values[n][i])} / {read}"
            )
        rows.append([header, *cells])
    factual = ", ".join(f"{k} {_show(v[0])}" for k, v in out.factual_values.items())
    given = "predicted from the image" if out.predicted_factuals else "given"
    table = markdown_table(["counterfactual", *columns], rows, [False] * (len(columns) + 1))
    note = "Read back: thickness and intensity by Morpho-MNIST's morphometrics, the digit by an independent oracle."
    return f"Factual values ({given}): {factual}\n\n{table}\n\n{note}"


def _enlarged(picture: torch.Tensor, size: int = 168) -> PIL.Image.Image:
    """A 28-pixel image in [0, 1] as a crisp `size`-pixel PIL image, large enough to see."""
    pixels = (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
    return PIL.Image.fromarray(pixels).resize((size, size), PIL.Image.NEAREST)


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

    def run(name, upload, drawing, example_values, target, variables, thickness, intensity, digit,
            progress=gr.Progress(True)):  # noqa: B008  # fmt: skip
        image = upload if upload is not None else drawn_digit(drawing)
        if image is None:
            raise gr.Error("Upload or draw a digit, or pick a held-out one.")
        factual = example_values if upload is not None and example_values else None
        if demo.is_scm(name):
            chosen = {"thickness": thickness, "intensity": intensity, "digit": None if digit == KEEP else int(digit)}
            request = {k: v for k, v in chosen.items() if k in (variables or [])}
        else:
            request = {demo.pipeline(name).single_categorical_parent(): target}
        try:
            gallery, grid, table = demo.counterfactuals(name, image, request, factual)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
        path = Path(tempfile.mkdtemp()) / "counterfactuals.png"
        grid.save(path)
        return gallery, table, str(path)

    def pick(name, index):
        image, values = demo.example(name, int(index))
        return image, values

    def controls(name):
        scm = demo.is_scm(name)
        return [gr.update(visible=not scm)] + [gr.update(visible=scm)] * 4

    with gr.Blocks(title="diffscm: counterfactual images") as app:
        gr.Markdown(
            "# diffscm: counterfactual images with diffusion models\n"
            "What would this digit look like had its digit, stroke thickness or intensity been different?"
        )
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW_IT_WORKS)
        with gr.Row():
            with gr.Column(scale=1):
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
                variables = gr.CheckboxGroup(["thickness", "intensity", "digit"], value=["thickness"], visible=False,
                                             label="intervene on (the others follow their mechanisms)",
                                             elem_id="variables")  # fmt: skip
                thickness = gr.Slider(0.5, 6.0, value=4.0, step=0.1, label="do(thickness = ...) px", visible=False)
                intensity = gr.Slider(64, 255, value=180, step=1, label="do(intensity = ...)", visible=False)
                digit = gr.Dropdown([KEEP] + [str(k) for k in range(10)], value=KEEP, label="do(digit = ...)",
                                    visible=False)  # fmt: skip
                button = gr.Button("Counterfactuals", variant="primary", elem_id="run")
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=upload, label="examples: click one, then Counterfactuals")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="factual | null intervention | counterfactuals", columns=4, height="auto",
                                     object_fit="contain", elem_id="gallery")  # fmt: skip
                table = gr.Markdown(elem_id="values")
                download = gr.File(label="download the grid")
        model.change(controls, model, [target, variables, thickness, intensity, digit])
        upload.upload(lambda: None, None, example_values)
        example.click(pick, [model, index], [upload, example_values])
        button.click(run, [model, upload, drawing, example_values, target, variables, thickness, intensity, digit],
                     [gallery, table, download])  # fmt: skip
        app.load(controls, model, [target, variables, thickness, intensity, digit])
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
