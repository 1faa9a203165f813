"""`diffscm serve`: a Gradio web demo of the shipped pipelines (also the Space's `app.py`).

Upload or draw a digit, or pick a held-out one; choose the model and the intervention; see the factual, its
reconstruction (the null intervention) and the counterfactuals with the values they were asked for and the anti-causal
predictor's reading; download the grid.
"""

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from functools import cache
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .. import hub, morphometrics
from ..data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from ..options import add_setting_options, device_and_dtype, pipeline_options
from ..paths import REPOSITORY, shipped_checkpoint
from ..tables import markdown_table

DEFAULT_MODELS = {
    "MNIST: digit -> image": "diffscm-mnist-conditional",
    "Morpho-MNIST: thickness -> intensity -> image <- digit": "diffscm-morphomnist-conditional",
    "Colour-MNIST: digit -> hue -> image": "diffscm-colour-mnist",
}
MAX_UPLOAD = "5mb"  # a digit is a few KB
MAX_PIXELS = 4096 * 4096  # refused from the header, before decoding: a small PNG can hold 13000 x 13000 pixels
CONCURRENCY = 1  # one request at a time uses every core; the others wait in the queue
QUEUE_SIZE = 32
CACHE_LIFETIME = (3600, 3600)  # Gradio's delete_cache: every hour, files older than an hour
REQUESTS_KEPT = 32  # the pictures and grids of the last requests; older ones are removed
EXAMPLES = [str(path) for path in sorted((REPOSITORY / "docs" / "examples").glob("*.png"))]  # in a checkout
# A 28 px digit is drawn at 224 px, its pixels kept square: the factual must be as easy to see as the counterfactuals.
PAGE_CSS = (
    "#factual img { height: 224px !important; width: auto !important; object-fit: contain !important; "
    "image-rendering: pixelated; } #values th, #values td { word-break: normal; overflow-wrap: normal; }"
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
    parser.add_argument(
        "--model", nargs="+", default=None, help="Pipeline folders or Hub ids to serve (default: the shipped ones)."
    )
    add_setting_options(parser)
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace):
    models = model_names(args.model) if args.model else None
    device, dtype = device_and_dtype(args)
    # Gradio's cache of uploads and results goes in a folder of this server's, removed when it stops: on Ctrl-C, and
    # on SIGTERM, which takes the same way out.
    with tempfile.TemporaryDirectory(prefix="diffscm-gradio-", dir=os.environ.get("GRADIO_TEMP_DIR")) as cache:
        os.environ["GRADIO_TEMP_DIR"] = cache
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        app = build_app(models, device, dtype, pipeline_options(args))
        app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
        launch(app, server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)


def model_names(models: list[str]) -> dict[str, str]:
    """{name shown in the page: folder or Hub id}: the folder's name, or its last two parts where two share one
    (`runs/a/pipeline`, `runs/b/pipeline`); a model given twice is refused."""
    if len(set(models)) != len(models):
        raise ValueError(f"--model names a model twice: {models}.")
    short = [Path(model).name or model for model in models]
    names = [str(Path(*Path(m).parts[-2:])) if short.count(n) > 1 else n for m, n in zip(models, short, strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: {models} would show under the same names {names}; give distinct folders.")
    return dict(zip(names, models, strict=True))


def launch(app, **options):
    """Serve the page of [`build_app`] with its style (Gradio takes the page's CSS at launch); errors are shown on
    the page with their reason (an upload that is no image, or too large one)."""
    return app.launch(css=PAGE_CSS, show_error=True, **options)


def limit_image_size():
    """Uploads larger than MAX_PIXELS are refused by PIL from their header, before any pixel is decoded (PIL raises
    its DecompressionBombError past twice MAX_IMAGE_PIXELS)."""
    PIL.Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


class CounterfactualDemo:
    """The demo's logic, apart from its widgets: models by display name, held-out examples, one request."""

    def __init__(
        self,
        models: dict[str, str] | None = None,
        device: str | None = None,
        dtype: str = "float32",
        options: dict | None = None,
    ):
        self.models = {name: path for name, path in (models or _shipped(DEFAULT_MODELS)).items()}
        if not self.models:
            raise FileNotFoundError("No pipeline to serve: none of the shipped checkpoints was found.")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, self.options = dtype, {key: value for key, value in (options or {}).items() if value is not None}
        self._pipelines, self._oracles = cache(self._load), cache(self._load_oracle)
        # One load at a time: diffusers loads inside accelerate's init_empty_weights, which swaps
        # torch.nn.Module.register_parameter for the whole process; two of Gradio's worker threads loading at once
        # could leave it swapped, and every module made afterwards in the process got meta parameters.
        self._loading = threading.Lock()
        self.grids = tempfile.TemporaryDirectory(prefix="diffscm-serve-")  # removed with the demo

    def pipeline(self, name: str):
        """The served pipeline `name`, loaded once."""
        with self._loading:
            return self._pipelines(name)

    def _oracle(self, folder: str):
        with self._loading:
            return self._oracles(folder)

    def _load_oracle(self, folder: str):
        from ..evaluation import DigitOracle

        return DigitOracle.from_pretrained(folder).eval().to(self.device)

    def keep_files(self, gallery: list[tuple[PIL.Image.Image, str]], grid: PIL.Image.Image) -> tuple[list, str]:
        """A request's gallery pictures and downloadable grid saved as files of their own in the demo's folder, which
        holds the last REQUESTS_KEPT requests' files. Files, not pictures: Gradio copies a file into its cache
        atomically, but rewrites a picture in place, so that another request with the same picture could be served a
        half-written one."""
        folder = Path(self.grids.name) / uuid.uuid4().hex[:12]
        folder.mkdir()
        files = []
        for index, (picture, caption) in enumerate(gallery):
            picture.save(folder / f"{index}.png")
            files.append((str(folder / f"{index}.png"), caption))
        grid.save(folder / "counterfactuals.png")
        for old in sorted(Path(self.grids.name).iterdir(), key=lambda p: p.stat().st_mtime)[:-REQUESTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        return files, str(folder / "counterfactuals.png")

    def _load(self, name: str):
        pipe = hub.load_pipeline(self.models[name], self.device, self.dtype)
        pipe.set_progress_bar_config(leave=False)
        return pipe

    def is_scm(self, name: str) -> bool:
        """Whether the model is intervened on variable by variable (else: do(class) of its one categorical parent)."""
        graph = self.pipeline(name).causal_graph
        return len(graph.image_parents) > 1 or graph.nodes[graph.image_parents[0]].type != "categorical"

    def example(self, name: str, index: int) -> tuple[PIL.Image.Image, dict]:
        """Held-out image number `index` of the model's split, and its factual values."""
        pipe = self.pipeline(name)
        folder = pipe.config._name_or_path
        rows = heldout_rows(folder, self._heldout_data(folder), 1, skip=index)
        if not rows:
            raise ValueError(f"The model holds out fewer than {index + 1} images.")
        return rows[0]["image"], {k: v.tolist() for k, v in pipe.causal_graph.data_values(rows).items()}

    @staticmethod
    def _heldout_data(folder: str):
        """The data set the model's split was drawn from (`training.json`): the bundled digits, or the local data set
        it names (a path like `data/morphomnist` also from the repository's root)."""
        record = Path(folder) / "training.json"
        source = json.loads(record.read_text()).get("split", {}).get("source") if record.is_file() else None
        if source in (None, BUNDLED_MNIST):
            return load_bundled_mnist()
        local = source if Path(source).exists() else REPOSITORY / source
        if not Path(local).exists():
            raise ValueError(f"The model's held-out images are in {source!r}, which is not here.")
        return load_image_dataset(dataset_name=str(local))

    def oracle(self, name: str):
        """The independent digit oracle of a shipped graph's data (never used for guidance), or None for another
        graph (its anti-causal predictor then reads the values back)."""
        parents = set(self.pipeline(name).causal_graph.image_parents)
        if parents == {"thickness", "intensity", "digit"}:
            return self._oracle(shipped_checkpoint("morphomnist-oracle"))
        if len(parents) == 1 and self.pipeline(name).unet.config.in_channels == 1:
            return self._oracle(shipped_checkpoint("mnist-oracle"))
        return None

    @torch.no_grad()
    def counterfactuals(self, name: str, image: PIL.Image.Image, request: dict, factual: dict | None = None):
        """The gallery (factual, null intervention, counterfactuals, each captioned), the same as one grid image, and
        a Markdown table: per variable the value asked, the value after propagation through the mechanisms, and the
        value read back from the picture by an independent measurement (or the model's predictor)."""
        from ..evaluation.plots import image_grid

        pipe = self.pipeline(name)
        graph = pipe.causal_graph
        if self.is_scm(name):
            intervention = {k: v for k, v in request.items() if v is not None}
            if not intervention:
                raise ValueError("Tick at least one variable to intervene on.")
            out = pipe(
                image,
                intervention=intervention,
                factual_values=factual,
                output_type="pt",
                return_reconstruction=True,
                **self.options,
            )
            headers = ["do(" + ", ".join(f"{k}={graph.show(k, v)}" for k, v in intervention.items()) + ")"]
            asked = [intervention]
        else:
            parent = pipe.single_categorical_parent()
            target = request.get(parent, "all")
            target = "all" if target == "all" else graph.nodes[parent].class_index(str(target))
            out = pipe(
                image,
                target=target,
                factual_values=factual,
                output_type="pt",
                return_reconstruction=True,
                **self.options,
            )
            headers = [f"do({parent}={graph.nodes[parent].value_name(t)})" for t in out.targets]
            asked = [{parent: int(t)} for t in out.targets]
        factual_image = (pipe.preprocess(image) + 1) / 2
        images = torch.cat([factual_image, out.reconstructions, out.images]).cpu()
        captions = ["factual", "null intervention (reconstruction)", *headers]
        gallery = [(_enlarged(picture), caption) for picture, caption in zip(images, captions, strict=True)]
        grid = image_grid(images[None], ["factual", "null", *headers], scale=4)
        oracle = self.oracle(name)
        if oracle is not None:
            readings, reader = read_back(images[2:], oracle, graph.image_parents), SHIPPED_READER
        else:
            readings, reader = pipe.read_parents(images[2:] * 2 - 1), PREDICTOR_READER
        return gallery, grid, values_table(out, headers, asked, readings, graph, reader)


def read_back(images: torch.Tensor, oracle, parents) -> dict[str, np.ndarray]:
    """What an independent measurement reads from each picture in [0, 1]: Morpho-MNIST's morphometrics for
    thickness and intensity, the oracle for the digit (the categorical parent)."""
    readings = {}
    if {"thickness", "intensity"} & set(parents):
        measured = morphometrics.measure(images)
        readings |= {k: measured[k] for k in ("thickness", "intensity") if k in parents}
    categorical = [p for p in parents if p not in readings]
    if categorical:
        from ..evaluation.metrics import oracle_predictions

        readings[categorical[0]] = oracle_predictions(oracle, images).numpy()
    return readings


SHIPPED_READER = (
    "Read back: thickness and intensity by Morpho-MNIST's morphometrics, the digit by an independent oracle."
)
PREDICTOR_READER = "Read back by the model's anti-causal predictor (which guided: not an independent judge)."


def values_table(out, headers: list[str], asked: list[dict], readings: dict, graph, reader: str) -> str:
    """Per counterfactual and variable: asked (or - when left to its mechanism), after propagation, read back."""
    names = list(out.counterfactual_values)
    columns = [f"{n}: asked / after propagation / read back" for n in names]
    rows = []
    for i, header in enumerate(headers):
        cells = []
        for n in names:
            request = asked[min(i, len(asked) - 1)]
            read = graph.show(n, readings[n][i]) if n in readings else "-"
            wanted = graph.show(n, request[n]) if n in request else "-"
            cells.append(f"{wanted} / {graph.show(n, out.counterfactual_values[n][i])} / {read}")
        rows.append([header, *cells])
    factual = ", ".join(f"{k} {graph.show(k, v[0])}" for k, v in out.factual_values.items())
    given = "predicted from the image" if out.predicted_factuals else "given"
    table = markdown_table(["counterfactual", *columns], rows, [False] * (len(columns) + 1))
    return f"Factual values ({given}): {factual}\n\n{table}\n\n{reader}"


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


def build_app(models: dict[str, str] | None = None, device: str | None = None, dtype: str = "float32", options=None):
    """The page: the model, the factual image (upload, drawing or a held-out one), and controls built from the
    model's causal graph: do(class) of a single categorical parent (or all classes), or per variable a box to
    intervene on it (unticked, it follows its mechanism), a slider over a continuous one's range and a list of a
    categorical one's class names. `dtype`, `options`: the weights' precision and the settings of every call (None:
    each model's own)."""
    import gradio as gr

    limit_image_size()
    demo = CounterfactualDemo(models, device, dtype, options)
    names = list(demo.models)

    def run(name, upload, drawing, example_values, request):
        image = upload if upload is not None else drawn_digit(drawing)
        if image is None:
            raise gr.Error("Upload or draw an image, or pick a held-out one.")
        factual = example_values if upload is not None and example_values else None
        try:
            gallery, grid, table = demo.counterfactuals(name, image, request, factual)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
        gallery, grid = demo.keep_files(gallery, grid)
        return gallery, table, grid

    def pick(name, index):
        try:
            return demo.example(name, int(index))
        except (ValueError, OSError) as error:
            raise gr.Error(str(error)) from error

    # Gradio's cache of uploads and results is emptied hourly and when the app closes.
    with gr.Blocks(title="diffscm: counterfactual images", delete_cache=CACHE_LIFETIME) as app:
        gr.Markdown(
            "# diffscm: counterfactual images with diffusion models\n"
            "What would this image look like had one of its causes been different?"
        )
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW_IT_WORKS)
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=names[0], label="model")
                with gr.Tab("upload"):
                    upload = gr.Image(
                        type="pil", image_mode=None, label="factual image", elem_id="factual", interactive=True
                    )
                with gr.Tab("draw"):
                    drawing = gr.Sketchpad(type="pil", label="draw a digit", interactive=True)
                with gr.Row():
                    index = gr.Number(value=0, precision=0, minimum=0, label="held-out image #")
                    example = gr.Button("pick a held-out image", elem_id="pick")
                example_values = gr.State(None)

                @gr.render(inputs=model)
                def controls(name):
                    inputs, outputs = [model, upload, drawing, example_values], [gallery, table, download]
                    graph_controls(gr, demo, name, run, inputs, button, outputs)

                button = gr.Button("Counterfactuals", variant="primary", elem_id="run")
                if EXAMPLES:
                    examples = gr.Examples(EXAMPLES, inputs=upload, label="examples: click one, then Counterfactuals")
                    examples.dataset.click(lambda: None, None, example_values)  # its own values, not a picked one's
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="factual | null intervention | counterfactuals",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                    elem_id="gallery",
                )
                table = gr.Markdown(elem_id="values")
                download = gr.File(label="download the grid")

        upload.upload(lambda: None, None, example_values)
        example.click(pick, [model, index], [upload, example_values])
    return app


def graph_controls(gr, demo, name: str, run, inputs: list, button, outputs: list):
    """The controls of model `name`, built from its causal graph, wired to `button`: do(class) of a single
    categorical parent (or all classes), else a box per variable to intervene on it and its value's control."""
    graph = demo.pipeline(name).causal_graph
    if not demo.is_scm(name):
        parent = graph.nodes[graph.image_parents[0]]
        choices = ["all"] + [parent.value_name(k) for k in range(parent.num_classes)]
        target = gr.Dropdown(choices, value="all", label=f"do({parent.name} = ...)", elem_id="target")
        button.click(lambda *chosen: run(*chosen[:4], {parent.name: chosen[4]}), [*inputs, target], outputs)
        return
    label = "intervene on (the others follow their mechanisms)"
    variables = gr.CheckboxGroup(graph.variables, value=graph.variables[:1], label=label, elem_id="variables")
    values = [_control(gr, graph.nodes[variable]) for variable in graph.variables]

    def request(*chosen):
        ticked, picked = chosen[4] or [], dict(zip(graph.variables, chosen[5:], strict=True))
        return run(*chosen[:4], {k: v for k, v in picked.items() if k in ticked})

    button.click(request, [*inputs, variables, *values], outputs)


def _control(gr, node):
    """A variable's control: a slider over a continuous range (starting at 65% of it), or a list of class names
    (starting at the last)."""
    label = f"do({node.name} = ...)"
    if node.type == "categorical":
        classes = [node.value_name(k) for k in range(node.num_classes)]
        return gr.Dropdown(classes, value=classes[-1], label=label, elem_id=f"do-{node.name}")
    low, high = node.range
    span = high - low
    value = round(low + 0.65 * span) if span >= 2 else round(low + 0.65 * span, 2)
    step = float(10 ** (np.floor(np.log10(span)) - 2))
    return gr.Slider(low, high, value=value, step=step, label=label, elem_id=f"do-{node.name}")


def _shipped(models: dict[str, str]) -> dict[str, str]:
    found = {}
    for name, checkpoint in models.items():
        try:
            found[name] = shipped_checkpoint(checkpoint)
        except FileNotFoundError:
            continue
    return found
