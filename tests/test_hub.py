import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_pipeline
from huggingface_hub.errors import LocalEntryNotFoundError

from diffscm import DiffSCMPipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory):
    """A saved tiny pipeline: `save_pretrained` ships its code for trust_remote_code."""
    folder = tmp_path_factory.mktemp("shared") / "diffscm-tiny"
    tiny_pipeline(size=16, guidance_scale=2.0, num_inference_steps=3).save_pretrained(folder)
    return folder


def hub_cache_with(folder, tmp_path, repo_id="someone/diffscm-tiny"):
    """A Hugging Face cache directory laid out as the Hub client leaves it after a download."""
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.parent.mkdir()
    subprocess.run(["cp", "-r", str(folder), str(snapshot)], check=True)
    return tmp_path / "hub"


def run_python(code: str, **env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=os.environ | {"HF_HUB_OFFLINE": "1"} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Expected types" not in result.stderr  # diffusers' warning when a component is not of the annotated class
    return result.stdout


def test_folder_with_remote_code_still_loads_with_diffscm(shared_folder):
    pipe = DiffSCMPipeline.from_pretrained(shared_folder)
    assert isinstance(pipe, DiffSCMPipeline) and pipe.config.guidance_scale == 2.0
    assert json.loads((shared_folder / "model_index.json").read_text())["_class_name"][0] == "pipeline_diffscm"
    assert DiffSCMPipeline.from_pretrained(shared_folder, guidance_scale=7.0).config.guidance_scale == 7.0


def test_hub_id_resolves_from_the_offline_cache(shared_folder, tmp_path):
    cache = hub_cache_with(shared_folder, tmp_path)
    out = run_python(
        """
        import torch
        from diffscm import DiffSCMPipeline
        pipe = DiffSCMPipeline.from_pretrained("someone/diffscm-tiny")
        pipe.set_progress_bar_config(disable=True)
        print(pipe(torch.rand(1, 1, 16, 16), 1, output_type="pt").images.shape)
        """,
        HF_HUB_CACHE=str(cache),
    )
    assert "torch.Size([1, 1, 16, 16])" in out


def test_plain_diffusers_loads_the_hub_id_with_trust_remote_code(shared_folder, tmp_path):
    cache = hub_cache_with(shared_folder, tmp_path)
    out = run_python(
        """
        import sys, torch
        sys.modules["diffscm"] = None  # diffscm is not installed for this user
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("someone/diffscm-tiny", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(torch.rand(2, 1, 16, 16), [0, 1], output_type="pt")
        print(type(pipe).__name__, tuple(out.images.shape), pipe.config.guidance_scale)
        """,
        HF_HUB_CACHE=str(cache),
    )
    assert "DiffSCMPipeline (2, 1, 16, 16) 2.0" in out


def test_unknown_hub_id_offline_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="'nobody/nothing-here' is not a local folder, and as a Hub id") as error:
        DiffSCMPipeline.from_pretrained("nobody/nothing-here", cache_dir=str(tmp_path))
    assert isinstance(error.value.__cause__, LocalEntryNotFoundError)


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such pipeline folder: 'checkpoints/diffscm-mnsit'"):
        DiffSCMPipeline.from_pretrained("checkpoints/diffscm-mnsit")


def test_missing_folder_and_foreign_folders_are_rejected(tmp_path, shared_folder):
    with pytest.raises(FileNotFoundError, match="No such pipeline folder"):
        DiffSCMPipeline.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no model_index.json"):
        DiffSCMPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": []}))
    with pytest.raises(ValueError, match="not a DiffSCMPipeline"):
        DiffSCMPipeline.from_pretrained(tmp_path)
    index = {
        "_class_name": "DiffSCMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "classifier": ["anticausal", "Nope"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown anti-causal predictor 'Nope'"):
        DiffSCMPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        DiffSCMPipeline.from_pretrained(tmp_path)


def test_corrupt_weights_are_rejected(tmp_path, shared_folder):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(shared_folder), str(broken)], check=True)
    weights = broken / "classifier" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"Cannot load the classifier from {weights}: Unable to load weights"):
        DiffSCMPipeline.from_pretrained(broken)


def test_loaded_pipeline_matches_the_saved_one(shared_folder):
    pipe = DiffSCMPipeline.from_pretrained(shared_folder)
    again = DiffSCMPipeline.from_pretrained(shared_folder)
    image = torch.rand(1, 1, 16, 16)
    assert torch.equal(pipe(image, 0, output_type="pt").images, again(image, 0, output_type="pt").images)


def test_plain_diffusers_loads_a_causal_graph_pipeline_with_trust_remote_code(tmp_path):
    from conftest import TINY_GRAPH, tiny_predictor, tiny_unet
    from diffusers import DDIMScheduler

    folder = tmp_path / "diffscm-scm-tiny"
    DiffSCMPipeline(
        tiny_unet(), DDIMScheduler(clip_sample=False), tiny_predictor(), causal_graph=TINY_GRAPH,
        guidance_scale={"brightness": 3.0, "position": 1.0}, num_inference_steps=3,
    ).save_pretrained(folder)  # fmt: skip
    assert json.loads((folder / "model_index.json").read_text())["classifier"] == ["anticausal", "AntiCausalPredictor"]
    out = run_python(
        f"""
        import sys, torch
        sys.modules["diffscm"] = None  # diffscm is not installed for this user
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(torch.rand(2, 1, 8, 8), intervention={{"level": 1.0}}, factual_values={{"level": 0.0}})
        print(type(pipe.classifier).__name__, len(out.images), sorted(out.counterfactual_values))
        """
    )
    assert "AntiCausalPredictor 2 ['brightness', 'level', 'position']" in out


def test_measured_defaults_are_saved_with_the_command_that_chose_them(tmp_path):
    from diffscm import hub

    pipe = tiny_pipeline(guidance_scale=1.0)
    pipe.save_pretrained(tmp_path)
    (tmp_path / "training.json").write_text(json.dumps({"commands": ["train.py"]}))
    hub.write_defaults(str(tmp_path), "python tune.py --save-defaults", {pipe.single_categorical_parent(): 3.0})
    loaded = DiffSCMPipeline.from_pretrained(tmp_path)
    assert loaded.guidance_scales() == {pipe.single_categorical_parent(): 3.0}
    assert json.loads((tmp_path / "training.json").read_text())["commands"] == ["train.py"]  # the training record kept
    assert "python tune.py --save-defaults" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="local pipeline folder"):
        hub.write_defaults(str(tmp_path / "missing"), "x", {})
    before = (tmp_path / "model_index.json").read_text()
    for bad in ({"causal_graph": {}}, {"steps": 10}):
        with pytest.raises(ValueError, match="not settings a pipeline's defaults hold"):
            hub.write_defaults(str(tmp_path), "x", **bad)
    assert (tmp_path / "model_index.json").read_text() == before, "nothing written on a refusal"


def test_a_fine_tuned_runs_chain_lists_each_command_once_in_order(tmp_path):
    """unet_commands: the data's command, the pipeline's chain it fine-tuned (which made the same data), its own."""
    from diffscm import hub

    data, base, run = tmp_path / "data", tmp_path / "base", tmp_path / "run"
    for folder in (data, base, run):
        folder.mkdir()
    make = "python training_scripts/make_colour_mnist.py --output_dir data"
    (data / "colour_mnist.json").write_text(json.dumps({"command": make}))
    chain = [make, "train_unet.py first", "train_classifier.py first"]
    (base / "training.json").write_text(json.dumps({"commands": chain}))
    args = {"pretrained_model_name_or_path": str(base)}
    (run / "training_args.json").write_text(json.dumps({"command": "train_unet.py second", "args": args}))
    (run / "split.json").write_text(json.dumps({"source": str(data)}))
    assert hub.unet_commands(run) == [make, "train_unet.py first", "train_unet.py second"]
    predictor, pipeline = tmp_path / "predictor", tmp_path / "pipeline"
    for folder in (predictor, pipeline):
        folder.mkdir()
    (run / "training_args.json").write_text(
        json.dumps({"command": "train_unet.py second", "args": args, "seconds_per_step": 1.0})
    )
    (predictor / "training_args.json").write_text(
        json.dumps({"command": "train_classifier.py second", "args": args, "seconds_per_step": 0.5})
    )
    (predictor / "split.json").write_text(json.dumps({"source": str(data)}))
    (predictor / "heldout_metrics.json").write_text("{}")
    hub.write_training_record(str(pipeline), str(run), str(predictor))
    in_order = [*chain, "train_unet.py second", "train_classifier.py second"]  # the base's predictor ran first
    assert json.loads((pipeline / "training.json").read_text())["commands"] == in_order
