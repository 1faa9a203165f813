"""One table of bad (and awkward but valid) input for the pipeline, the command line and the training scripts: every
bad one gets a clear error that names the problem, every valid one the right result, none a raw traceback."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline
from diffusers import DDIMScheduler

from diffscm import DiffSCMPipeline
from diffscm.cli import main

ROOT = Path(__file__).resolve().parents[1]

IMAGE = torch.rand(2, 1, 8, 8)

# (keyword arguments of pipe(IMAGE, ...), exception, message)
PIPELINE_CALLS = [
    ({"target": 2}, ValueError, r"class indices in \[0, 1\]"),
    ({"target": 0.5}, TypeError, "integer class indices"),
    ({"target": "three"}, ValueError, "'all'"),
    ({"target": [0, 1, 0]}, ValueError, "one per image"),
    ({"target": 0, "guidance_scale": True}, ValueError, "guidance_scale` must be a number in \\[0, 1000\\]"),
    ({"target": 0, "guidance_scale": -1}, ValueError, "guidance_scale` must be a number in \\[0, 1000\\]"),
    ({"target": 0, "guidance_scale": float("inf")}, ValueError, "guidance_scale` must be a number in \\[0, 1000\\]"),
    ({"target": 0, "guidance_scale": "12"}, ValueError, "guidance_scale` must be a number in \\[0, 1000\\]"),
    ({"target": 0, "guidance_scale": {"colour": 1.0}}, ValueError, "not parents of the image"),
    ({"target": 0, "guidance_scale": 1e6}, ValueError, "guidance_scale` must be a number in \\[0, 1000\\]"),
    ({"target": 0, "num_inference_steps": True}, ValueError, "num_inference_steps` must be an integer"),
    ({"target": 0, "num_inference_steps": 2.5}, ValueError, "num_inference_steps` must be an integer"),
    ({"target": 0, "num_inference_steps": 0}, ValueError, "num_inference_steps` must be an integer >= 1"),
    ({"target": 0, "num_inference_steps": 5000}, ValueError, "at most 1000"),
    ({"target": 0, "abduction_refinement_steps": -1}, ValueError, "abduction_refinement_steps"),
    ({"target": 0, "abduction_refinement_steps": 1.5}, ValueError, "abduction_refinement_steps"),
    ({"target": 0, "strength": "1"}, ValueError, "`strength` must be a number in \\(0, 1\\]"),
    ({"target": 0, "strength": 0}, ValueError, "strength"),
    ({"target": 0, "eta": 2.0}, ValueError, "eta"),
    ({"target": 0, "eta": "0"}, ValueError, "eta"),
    ({"target": 0, "cfg_scale": 2.0}, ValueError, "needs a conditional mechanism"),
    ({"target": 0, "output_type": "jpg"}, ValueError, "output_type"),
    ({"target": 0, "generator": [torch.Generator()] * 3, "eta": 0.5}, ValueError, "3 generators for 2 samples"),
    ({"intervention": {"colour": 1}}, ValueError, "Unknown variable 'colour'"),
    ({"intervention": {"label": 1}, "factual_values": [1]}, ValueError, "must be a dict"),
    ({}, ValueError, "either `target` or `intervention`"),
]

# (image given to pipe(image, target=0), exception, message)
BAD_IMAGES = [
    (np.full((8, 8), np.nan, dtype=np.float32), ValueError, "NaN"),
    (torch.full((1, 1, 8, 8), float("inf")), ValueError, "NaN or infinite"),
    (torch.rand(1, 2, 8, 8), ValueError, "2 channels"),
    (torch.rand(1, 1, 1, 8, 8), ValueError, r"\(C, H, W\)"),
    (torch.rand(1, 1, 8, 8) * 2 - 1, ValueError, r"\[0, 1\]"),
    (np.full((8, 8), 300, dtype=np.int32), ValueError, r"\[0, 255\]"),
    (np.zeros((8, 8), dtype=bool), TypeError, "dtype"),
    (torch.zeros(1, 1, 8, 8, dtype=torch.complex64), TypeError, "dtype"),
    ("digit.png", TypeError, "PIL image, numpy array"),
    (PIL.Image.fromarray(np.full((8, 8), 200, dtype=np.float32)), ValueError, "PIL mode 'F' .* Divide 0..255"),
    (np.array([[1, 2], [3, 4]], dtype=object), TypeError, "must hold numbers; got dtype object"),
    (np.array([["a", "b"]]), TypeError, "must hold numbers"),
    ([], ValueError, "empty"),
    (PIL.Image.fromarray(np.dstack([np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=np.uint8) * 255])), ValueError,
     "only in the alpha channel"),
]  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(num_inference_steps=2)


@pytest.mark.parametrize("kwargs, error, message", PIPELINE_CALLS)
def test_pipeline_call(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(IMAGE, **kwargs)


@pytest.mark.parametrize("image, error, message", BAD_IMAGES)
def test_bad_image(pipe, image, error, message):
    with pytest.raises(error, match=message):
        pipe(image, target=0)


def grey(value: float) -> torch.Tensor:
    return torch.full((1, 1, 8, 8), value)


@pytest.mark.parametrize(
    "image, expected",
    [
        (PIL.Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)), grey(32768 / 65535)),  # 16-bit PNG, "I;16"
        (np.full((8, 8), 65535, dtype=np.uint16), grey(1.0)),
        (torch.full((1, 8, 8), 65535, dtype=torch.uint16), grey(1.0)),
        (PIL.Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)), grey(0.25)),  # PIL "F" in [0, 1]
        (PIL.Image.fromarray(np.dstack([np.full((8, 8, 3), 255, np.uint8), np.full((8, 8), 128, np.uint8)])),
         grey(128 / 255)),  # white at half alpha over black
        (PIL.Image.fromarray(np.full((8, 8), 200, dtype=np.int32)), grey(200 / 255)),  # mode "I", as numpy reads it
        (np.full((8, 8), 200, dtype=np.int32), grey(200 / 255)),
        (PIL.Image.new("LA", (8, 8), (255, 128)).convert("La"), grey(128 / 255)),  # premultiplied alpha
        (np.full((8, 8), 200, dtype=np.uint32), grey(200 / 255)),
        (torch.full((1, 8, 8), 200, dtype=torch.uint64), grey(200 / 255)),
        (torch.full((1, 8, 8), 0.5).to_sparse(), grey(0.5)),
        (np.full((8, 16), 0.5, dtype=np.float32)[:, ::2], grey(0.5)),  # not contiguous
    ],
)  # fmt: skip
def test_awkward_images_are_read_by_their_real_range(pipe, image, expected):
    torch.testing.assert_close((pipe.preprocess(image) + 1) / 2, expected, atol=1 / 255, rtol=0)


def test_numpy_and_torch_scalars_are_numbers(pipe):
    out = pipe(IMAGE, target=np.int64(1), guidance_scale=np.float32(2), num_inference_steps=np.int64(2),
               strength=np.float64(1.0), abduction_refinement_steps=torch.tensor(0), output_type="pt")  # fmt: skip
    assert out.images.shape == (2, 1, 8, 8)


def test_an_abduction_carries_its_chain(pipe):
    abduction = pipe.abduct(IMAGE, num_inference_steps=3, strength=0.5, abduction_refinement_steps=1)
    assert (abduction.num_inference_steps, abduction.strength, abduction.abduction_refinement_steps) == (3, 0.5, 1)
    with pytest.raises(TypeError, match="Abduction returned by `abduct`"):
        pipe.intervene(abduction.noise, 0)
    with pytest.raises(ValueError, match="NaN"):
        pipe.intervene(replace(abduction, noise=abduction.noise * float("nan")), 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "pipeline"
    tiny_pipeline(size=28, num_classes=10, num_inference_steps=2).save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"split": {"source": "mnist-bundled", "heldout_indices": [1]}}))
    return folder


def digit_file(folder, name="x.png"):
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / name)
    return str(folder / name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["counterfactual", "missing.png", "--target", "1"], "No such image file"),
        (["counterfactual", "{text}", "--target", "1"], "Cannot read"),
        (["counterfactual", "{image}", "--target", "12"], "class in 0..9"),
        (["counterfactual", "{image}", "--intervention", "label"], "NAME=VALUE"),
        (["counterfactual", "{image}", "--intervention", "label=3", "label=5"], "'label' twice (label=3 and label=5)"),
        (["counterfactual", "{image}", "--target", "3", "--factual", "label=7", "label=1"], "gives 'label' twice"),
        (["counterfactual", "{image}", "--intervention", "label=three"], "no \"classes\""),
        (["counterfactual", "{image}", "--target", "1", "--steps", "0"], "num_inference_steps"),
        (["counterfactual", "{image}", "--target", "1", "--guidance-scale", "strong"], "--guidance-scale takes"),
        (["counterfactual", "{image}", "--target", "1", "--out", "{file}"], "is a file, not a folder"),
        (["counterfactual", "{image}", "--target", "1", "--model", "{tmp}/checkpoints/diffscm-mnsit"],
         "No such pipeline folder"),
        (["evaluate", "--model", "{model}", "--out", "{file}"], "is a file, not a folder"),
        (["evaluate-scm", "--model", "{model}", "--out", "{file}"], "is a file, not a folder"),
        (["demo", "--model", "{model}", "--out", "{file}"], "is a file, not a folder"),
        (["demo", "--num-digits", "0"], "--num-digits"),
        (["evaluate", "--abduction-settings", "20"], "STEPS:REFINEMENT"),
        (["evaluate", "--model", "{model}", "--data-dir", "/no/such", "--out", "{tmp}/o"], "is not a folder"),
    ],
)  # fmt: skip
def test_command_line(model_dir, tmp_path, argv, message):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "checkpoints").mkdir()
    names = {"text": tmp_path / "notes.png", "image": digit_file(tmp_path), "tmp": tmp_path, "model": model_dir,
             "file": tmp_path / "notes.png"}  # fmt: skip
    argv = [arg.format(**names) for arg in argv]
    if argv[0] == "counterfactual" and "--model" not in argv:
        argv += ["--model", str(model_dir)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert message in str(excinfo.value)


def test_an_unwritable_out_is_found_before_the_work(model_dir, tmp_path, monkeypatch):
    import diffscm.cli.counterfactual as command

    monkeypatch.setattr(
        command.hub, "load_pipeline", lambda *_: pytest.fail("the model loaded before --out was checked")
    )
    with pytest.raises(SystemExit, match="cannot be written"):  # a folder below a file can never be made
        main(["counterfactual", digit_file(tmp_path), "--target", "1", "--out", digit_file(tmp_path) + "/out"])


def test_the_command_line_runs_in_another_precision(model_dir, tmp_path, capsys):
    main(["counterfactual", digit_file(tmp_path), "--target", "3", "--model", str(model_dir), "--device", "cpu",
          "--dtype", "bfloat16", "--out", str(tmp_path / "cf")])  # fmt: skip
    assert (tmp_path / "cf" / "x_do3.png").is_file()
    with pytest.raises(SystemExit):
        main(["counterfactual", digit_file(tmp_path), "--target", "3", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_two_inputs_with_one_name_do_not_overwrite_each_other(model_dir, tmp_path):
    first, second = digit_file(tmp_path / "a"), digit_file(tmp_path / "b")
    third = digit_file(tmp_path / "c", "x-2.png")  # already called as the second x would be renamed
    main(["counterfactual", first, third, second, "--target", "3", "--model", str(model_dir), "--out",
          str(tmp_path / "cf")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["x-2_do3.png", "x-3_do3.png", "x_do3.png"]


def pipeline_folder(tmp_path, source, break_it):
    folder = tmp_path / "pipeline"
    shutil.copytree(source, folder)
    break_it(folder)
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "break_it, error, message",
    [
        (lambda f: (f / "classifier" / "diffusion_pytorch_model.safetensors").unlink(), ValueError,
         "classifier has no weights"),
        (lambda f: truncate(f / "unet" / "diffusion_pytorch_model.safetensors"), ValueError,
         "Cannot load the unet from"),
        (lambda f: (f / "model_index.json").write_text("{not json"), ValueError, "is corrupt"),
        (lambda f: (f / "model_index.json").unlink(), ValueError, "no model_index.json"),
        (lambda f: shutil.rmtree(f / "unet"), ValueError, "records a unet .* but has no unet/ folder"),
    ],
)  # fmt: skip
def test_broken_pipeline_folders_are_named(model_dir, tmp_path, break_it, error, message):
    with pytest.raises(error, match=message):
        DiffSCMPipeline.from_pretrained(pipeline_folder(tmp_path, model_dir, break_it))


def with_one_tensor_missing(folder):
    from safetensors.torch import load_file, save_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(weights))


def pickled_only(folder):
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


def with_an_unknown_key(folder):
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"guidance_scael": 3.0}))


def edited_config(component: str, key: str, value):
    def edit(folder):
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        config = json.loads((folder / component / name).read_text())
        (folder / component / name).write_text(json.dumps(config | {key: value}))
        record = {"commands": ["accelerate launch training_scripts/train_unet.py --resolution 28 --output_dir x"]}
        (folder / "training.json").write_text(json.dumps(record))

    return edit


@pytest.mark.parametrize(
    "break_it, message",
    [
        (edited_config("scheduler", "num_train_timesteps", 10), "trained with --num_train_timesteps 1000 .* says 10"),
        (edited_config("unet", "sample_size", 32), "trained with --resolution 28 .* says 32"),
        (edited_config("scheduler", "prediction_type", "v_prediction"), "--prediction_type epsilon .* v_prediction"),
    ],
)
def test_a_config_that_disagrees_with_the_recorded_training_is_refused(model_dir, tmp_path, break_it, message):
    with pytest.raises(ValueError, match=message):
        DiffSCMPipeline.from_pretrained(pipeline_folder(tmp_path, model_dir, break_it))


@pytest.mark.parametrize(
    "break_it, message",
    [
        (with_one_tensor_missing, r"diffusion_pytorch_model.safetensors does not fit the unet's config \(missing"),
        (pickled_only, "only pickled weights .*diffusion_pytorch_model.bin.*, which can run code"),
        (with_an_unknown_key, r"model_index.json: unknown key\(s\) \['guidance_scael'\]"),
    ],
)
def test_folders_that_diffusers_would_load_with_a_warning_are_refused(model_dir, tmp_path, break_it, message):
    with pytest.raises(ValueError, match=message):
        DiffSCMPipeline.from_pretrained(pipeline_folder(tmp_path, model_dir, break_it))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"use_safetensors": False}, ValueError, "safetensors weights only"),
        ({"device_map": "auto"}, ValueError, "`device_map` is not supported"),
        ({"torch_dtype": "float61"}, TypeError, "torch dtype or its name"),
        ({"torch_dtype": torch.float16, "dtype": torch.float16}, TypeError, "not both"),
    ],
)
def test_diffusers_loading_keywords_are_refused_with_a_reason(model_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        DiffSCMPipeline.from_pretrained(model_dir, **kwargs)


@pytest.mark.parametrize("kwargs", [{"torch_dtype": "bfloat16"}, {"dtype": torch.bfloat16},
                                    {"torch_dtype": "torch.bfloat16", "low_cpu_mem_usage": True}])  # fmt: skip
def test_dtype_by_name_and_diffusers_new_keyword_load_in_that_dtype(model_dir, kwargs):
    assert DiffSCMPipeline.from_pretrained(model_dir, **kwargs).unet.dtype == torch.bfloat16


def test_integer_class_folders_keep_their_integers(tmp_path):
    from diffscm.data import load_image_dataset

    for digit in ("3", "7"):
        (tmp_path / digit).mkdir()
        PIL.Image.new("L", (28, 28)).save(tmp_path / digit / "a.png")
    assert sorted(load_image_dataset(train_data_dir=str(tmp_path))["label"]) == [3, 7]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "training_scripts" / script), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train_unet.py", ["--train_data_dir", "{text_folder}"], "holds no images"),
        ("train_unet.py", ["--train_data_dir", "/no/such/folder"], "does not exist"),
        ("train_unet.py", ["--extra_train_data_dir", "/no/such/folder"], "does not exist"),
        ("train_unet.py", ["--train_data_dir", "{morpho}", "--split", "validation2"], "no Morpho-MNIST split"),
        ("train_unet.py", ["--causal_graph", "{text_folder}/notes.txt"], "--causal_graph"),
        ("train_unet.py", ["--parent_dropout", "1.5"], "--parent_dropout must be in [0, 1)"),
        ("redraw_morphomnist.py", ["--variants", "0"], "--variants and --num_proc must be >= 1"),
    ],
)
def test_training_scripts_refuse_with_a_message_not_a_traceback(tmp_path, script, args, message):
    text_folder = tmp_path / "texts"
    (text_folder / "a").mkdir(parents=True)
    (text_folder / "a" / "notes.txt").write_text("no images here")
    (text_folder / "notes.txt").write_text("{not a graph")
    names = {"text_folder": text_folder, "morpho": ROOT / "data" / "morphomnist"}
    result = run_script(script, *[arg.format(**names) for arg in args], "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "native, precision, warned", [(False, "bf16", True), (True, "bf16", False), (False, "no", False)]
)
def test_bf16_training_on_a_cpu_that_emulates_it_warns(monkeypatch, caplog, native, precision, warned):
    from diffscm import training

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    with caplog.at_level("WARNING", logger=training.logger.name):
        training.warn_if_emulated_bf16(precision, torch.device("cpu"))
    assert ("--mixed_precision no" in caplog.text) is warned


def test_a_sample_predicting_unet_is_refused():
    pipe = tiny_pipeline()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="Only epsilon- and v-prediction UNets are supported, got 'sample'"):
        DiffSCMPipeline(pipe.unet, scheduler, pipe.classifier)


@pytest.mark.parametrize("flag", ["--eval_batch_size", "--num_epochs"])
def test_train_unet_refuses_a_count_below_one_before_any_work(tmp_path, flag):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_scripts"))
    import train_unet

    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        train_unet.parse_args(["--output_dir", str(tmp_path / "out"), flag, "0"])


def test_an_input_that_an_output_would_overwrite_is_refused_before_any_work(model_dir, tmp_path):
    first, second = digit_file(tmp_path / "o"), digit_file(tmp_path / "o", "x_do3.png")
    with pytest.raises(SystemExit, match="x_do3.png is an input.*use another --out"):
        main(["counterfactual", first, second, "--target", "3", "--model", str(model_dir), "--out",
              str(tmp_path / "o")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.png", "x_do3.png"]


def test_a_file_an_earlier_run_left_is_replaced_only_with_overwrite(model_dir, tmp_path):
    digit, out = digit_file(tmp_path, "seven.png"), tmp_path / "o"
    out.mkdir()
    (out / "seven_do3.png").write_text("keep")
    command = ["counterfactual", digit, "--target", "3", "--model", str(model_dir), "--out", str(out), "--steps", "2"]
    with pytest.raises(SystemExit, match="already holds seven_do3.png.*--overwrite"):
        main(command)
    assert (out / "seven_do3.png").read_text() == "keep", "refused before anything was written"
    main([*command, "--overwrite"])
    assert PIL.Image.open(out / "seven_do3.png").size == (28, 28), "replaced by the counterfactual"


def test_an_exif_rotated_photo_is_read_upright_and_an_image_bomb_is_refused(tmp_path):
    from diffscm.cli.counterfactual import read_image
    from diffscm.image_processing import unit_images

    upright = np.zeros((28, 20), np.uint8)
    upright[:4] = 255  # a bar at the top
    exif = PIL.Image.Exif()
    exif[0x112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    PIL.Image.fromarray(upright).transpose(PIL.Image.Transpose.ROTATE_90).save(tmp_path / "up.jpg", exif=exif)
    shown = (
        unit_images(read_image(str(tmp_path / "up.jpg")), 1, 28)[0, 0, :, 4:24].numpy() * 255
    )  # the pipeline's view
    assert shown[:4].mean() > shown[4:].mean() + 100, "the bar is at the top, in the CLI and in Python"
    bomb = tmp_path / "bomb.png"
    PIL.Image.new("1", (20000, 20000)).save(bomb)
    with pytest.raises(ValueError, match="too large an image"):
        read_image(str(bomb))


def test_a_meta_tensor_is_refused_by_name(pipe):
    with pytest.raises(ValueError, match="meta device"):
        pipe(torch.empty(1, 1, 8, 8, device="meta"), target=1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["counterfactual", "{image}", "--target", "²"], "class in 0..9"),
        (["counterfactual", "--dataset", "mnist-bundled", "--target", "random", "--seed", "-1", "--out", "{tmp}/o"],
         "--seed must be >= 0"),
    ],
)  # fmt: skip
def test_command_line_round_4(model_dir, tmp_path, argv, message):
    argv = [a.format(image=digit_file(tmp_path), tmp=tmp_path) for a in argv] + ["--model", str(model_dir)]
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_one_class_folder_is_named_as_the_reason(tmp_path):
    from diffscm.data import load_image_dataset

    digit_file(tmp_path / "t" / "3")
    with pytest.raises(ValueError, match="one class sub-folder \\(3/\\)"):
        load_image_dataset(train_data_dir=str(tmp_path / "t"))


def test_a_full_disk_at_a_checkpoint_is_named(monkeypatch, tmp_path):
    import argparse

    from diffscm import training

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 326976 vs 326868")

    args = argparse.Namespace(output_dir=str(tmp_path), checkpoints_total_limit=None)
    with pytest.raises(RuntimeError, match="MiB are free on its disk.*--resume_from_checkpoint latest"):
        training.save_checkpoint(Accelerator(), args, 4)


def test_the_fingerprint_follows_symlinked_weights_and_covers_the_scheduler_config(model_dir, tmp_path):
    from diffscm.dataset_counterfactuals import model_fingerprint

    elsewhere, linked = tmp_path / "elsewhere", tmp_path / "linked"
    shutil.copytree(model_dir / "unet", elsewhere / "unet")
    linked.mkdir()
    for item in model_dir.iterdir():
        (linked / item.name).symlink_to(elsewhere / "unet" if item.name == "unet" else item, item.is_dir())
    before = model_fingerprint(DiffSCMPipeline.from_pretrained(linked))
    weights = next((elsewhere / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    changed = model_fingerprint(DiffSCMPipeline.from_pretrained(linked))
    assert changed["model_sha256"] != before["model_sha256"], "new weights behind a symlinked unet/"
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    settings = json.loads(config.read_text())
    settings["timestep_spacing"] = "trailing" if settings.get("timestep_spacing") != "trailing" else "leading"
    config.write_text(json.dumps(settings))
    original = model_fingerprint(DiffSCMPipeline.from_pretrained(model_dir))["model_sha256"]
    assert model_fingerprint(DiffSCMPipeline.from_pretrained(copy))["model_sha256"] != original


@pytest.mark.parametrize(
    "keywords, error, message",
    [
        ({"eta": 0.5, "generator": 0}, TypeError, "torch.Generator().manual_seed"),
        ({"eta": 0.5, "generator": [0]}, TypeError, "torch.Generator().manual_seed"),
        ({"callback_on_step_end": lambda p, i, t, k: None}, TypeError, "must return a dict"),
    ],
)
def test_a_seed_for_a_generator_and_a_callback_without_a_dict_are_named(pipe, keywords, error, message):
    with pytest.raises(error, match=re.escape(message)):
        pipe(torch.rand(1, 1, 8, 8), target=1, **keywords)


def test_from_pretrained_says_which_keywords_it_takes(model_dir, monkeypatch, tmp_path):
    assert DiffSCMPipeline.from_pretrained(model_dir, trust_remote_code=True).unet is not None
    with pytest.raises(TypeError, match="does not take \\['custom_pipeline'\\].*trust_remote_code=True"):
        DiffSCMPipeline.from_pretrained(model_dir, custom_pipeline="x")
    with pytest.raises(ValueError, match="no safety checker"):
        DiffSCMPipeline.from_pretrained(model_dir, safety_checker=object())
    monkeypatch.setenv("HOME", str(model_dir.parent))
    assert DiffSCMPipeline.from_pretrained(f"~/{model_dir.name}").unet is not None


def test_a_save_over_another_pipeline_replaces_it_whole_and_a_failed_save_changes_nothing(model_dir, tmp_path):
    folder = tmp_path / "x"
    shutil.copytree(model_dir, folder)
    (folder / "evaluation.md").write_text("the other pipeline's evaluation")
    other = tiny_pipeline(size=16, num_classes=3, num_inference_steps=2)
    other.save_pretrained(folder)
    assert not (folder / "training.json").exists() and not (folder / "evaluation.md").exists(), "no stale records"
    assert DiffSCMPipeline.from_pretrained(folder).unet.config.sample_size == 16
    shutil.rmtree(folder)
    shutil.copytree(model_dir, folder)
    reloaded = DiffSCMPipeline.from_pretrained(folder)
    reloaded.save_pretrained(folder)  # in place: its own records stay
    assert (folder / "training.json").is_file()
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.MonkeyPatch.context() as patch:
        module = sys.modules[DiffSCMPipeline.__module__]
        patch.setattr(module, "write_remote_code", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            other.save_pretrained(folder)
    assert sorted(p.name for p in folder.rglob("*")) == before, "the folder is as it was"
    assert DiffSCMPipeline.from_pretrained(folder).unet.config.sample_size == 28
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="holds files but no pipeline"):
        other.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize(
    "image, message",
    [
        ([[torch.zeros(1, 8, 8)]], "nested list"),
        (torch.zeros(8, 8, 3), "looks channels-last"),
        (torch.zeros(8, 8, 1), "looks channels-last"),
    ],
)
def test_a_nested_list_or_a_channels_last_tensor_gets_a_hint(pipe, image, message):
    with pytest.raises((TypeError, ValueError), match=message):
        pipe(image, target=1)


def test_a_callback_that_returns_nan_is_named(pipe):
    with pytest.raises(ValueError, match="after your callback.*the callback returned them"):
        pipe(torch.rand(1, 1, 8, 8), target=1,
             callback_on_step_end=lambda p, i, t, k: {"sample": k["sample"] * float("nan")})  # fmt: skip


def test_an_implausible_sample_size_is_refused_at_load(model_dir, tmp_path):
    folder = tmp_path / "huge"
    shutil.copytree(model_dir, folder)
    (folder / "training.json").unlink()
    for config in (folder / "unet" / "config.json", folder / "classifier" / "config.json"):
        if config.is_file():
            config.write_text(json.dumps(json.loads(config.read_text()) | {"sample_size": 30000}))
    with pytest.raises(ValueError, match="sample_size is 30000"):
        DiffSCMPipeline.from_pretrained(folder)
