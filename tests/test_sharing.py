"""Any pipeline is shareable: built by hand (either mechanism), saved with its code and model card, loaded back by
diffscm and by plain diffusers, pushed to the Hub (faked offline into a cache) and loaded by Hub id; a folder without
the code (the shipped MNIST pipeline) is staged; `torch_dtype` reaches every component."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_GRAPH, tiny_parent_embedding, tiny_pipeline, tiny_predictor, tiny_unet
from diffusers import DDIMScheduler
from huggingface_hub import HfApi
from test_hub import hub_cache_with, run_python

from diffscm import DiffSCMPipeline, SemanticEncoder, hub, model_cards

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
MNIST = CHECKPOINTS / "diffscm-mnist"
REQUESTS = {
    "guided": {"target": [0, 1]},
    "conditional": {"intervention": {"position": 1}, "factual_values": {"position": [0, 1], "brightness": 0.7}},
    "semantic": {"intervention": {"position": 1}, "factual_values": {"position": [0, 1], "brightness": 0.7}},
    "mnist": {"target": 3, "num_inference_steps": 2, "abduction_refinement_steps": 0},
}
PLAIN_DIFFUSERS = """
import sys, torch
sys.modules["diffscm"] = None  # diffscm is not installed for this user
from diffusers import DiffusionPipeline
torch.set_num_threads(1)  # as in this process (conftest): the same reduction order, the same numbers
for source, request, image, out, resave in {jobs!r}:
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    torch.save(pipe(torch.load(image), output_type="pt", **request).images, out)
    print(type(pipe).__name__, pipe.mechanism)
    if resave:
        pipe.save_pretrained(resave)
"""


def hand_built(mechanism: str) -> DiffSCMPipeline:
    """A classifier-guided pipeline, or a conditional one without a classifier (with a semantic encoder too), as a
    user builds them by hand."""
    if mechanism == "guided":
        return tiny_pipeline(guidance_scale=2.0, num_inference_steps=3)
    torch.manual_seed(0)
    embedding = tiny_parent_embedding()
    with torch.no_grad():  # not the zero start of training: the conditioning shows in the outputs
        for parameter in embedding.parameters():
            parameter.normal_(0, 0.5)
    encoder = None
    if mechanism == "semantic":
        encoder = SemanticEncoder(in_channels=1, latent_dim=3, embedding_dim=32, block_out_channels=(4,))
        torch.nn.init.normal_(encoder.embedding.weight, 0, 0.5)
    pipe = DiffSCMPipeline(
        tiny_unet(class_embed_type="identity"), DDIMScheduler(clip_sample=False), parent_embedding=embedding,
        semantic_encoder=encoder, causal_graph=TINY_GRAPH, cfg_scale={"position": 2.0}, num_inference_steps=3,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(size: int = 8) -> torch.Tensor:
    return torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))


def run(pipe: DiffSCMPipeline, name: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(images(28 if name == "mnist" else 8), output_type="pt", **REQUESTS[name]).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """{mechanism: (the folder `save_pretrained` wrote, the built pipeline's counterfactuals)}."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name in ("guided", "conditional", "semantic"):
        pipe = hand_built(name)
        pipe.save_pretrained(root / f"diffscm-{name}")
        folders[name] = root / f"diffscm-{name}", run(pipe, name)
    return folders


def plain_diffusers(jobs: list[tuple], tmp_path: Path, **env) -> str:
    """Run each `(source, request name, resave folder or None)` with plain diffusers in a fresh process; the outputs
    land in `tmp_path/<request name>.pt`."""
    rows = []
    for source, name, resave in jobs:
        torch.save(images(28 if name == "mnist" else 8), tmp_path / f"{name}-input.pt")
        rows.append((str(source), REQUESTS[name], str(tmp_path / f"{name}-input.pt"), str(tmp_path / f"{name}.pt"),
                     resave and str(resave)))  # fmt: skip
    return run_python(PLAIN_DIFFUSERS.format(jobs=rows), **env)


def test_hand_built_pipelines_come_back_through_both_loaders(saved, tmp_path):
    for name, (folder, expected) in saved.items():
        torch.testing.assert_close(run(DiffSCMPipeline.from_pretrained(folder), name), expected)
    jobs = [(folder, name, tmp_path / f"resaved-{name}") for name, (folder, _) in saved.items()]
    out = plain_diffusers(jobs, tmp_path)
    assert "DiffSCMPipeline classifier-guided" in out and "DiffSCMPipeline conditional" in out
    for name, (_, expected) in saved.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected)
        # saved again by plain diffusers: code and weights without the card (diffscm renders it), and it loads
        resaved = tmp_path / f"resaved-{name}"
        assert not (resaved / "README.md").exists() and model_cards.missing_remote_code(resaved) == []
        torch.testing.assert_close(run(DiffSCMPipeline.from_pretrained(resaved), name), expected)


def test_the_card_of_a_hand_built_pipeline_names_its_mechanism_and_runs(saved, tmp_path, monkeypatch):
    guided = (saved["guided"][0] / "README.md").read_text()
    conditional = (saved["conditional"][0] / "README.md").read_text()
    semantic = (saved["semantic"][0] / "README.md").read_text()
    assert "**semantic_encoder**: semantic abduction" in semantic and "3-dimensional latent" in semantic
    assert "semantic_encoder" not in conditional
    assert "Mechanism: **classifier-guided**" in guided and "- classifier-guidance" in guided
    assert "19,330 parameters" in guided and "`guidance_scale` 2.0: anti-causal guidance;" in guided
    assert "Mechanism: **conditional**" in conditional and "- classifier-free-guidance" in conditional
    assert "**parent_embedding**: brightness, position" in conditional and "**classifier**: none" in conditional
    assert "`cfg_scale` brightness 1.0, position 2.0" in conditional and "(none: no predictor)" in conditional
    assert "| brightness | continuous | [0.5, 1] | level | 0.5 + 0.5 sigmoid(level + 0.5 u) |" in conditional
    for card in (guided, conditional):
        assert "Causal graph: `" in card and "trust_remote_code=True" in card
        assert "Not recorded: this folder has no `training.json`" in card
        assert "Not recorded: this folder has no `evaluation.md`" in card
    monkeypatch.chdir(tmp_path)  # the examples save counterfactual.png
    for folder, _ in saved.values():
        example = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.DOTALL).group(1)
        scope = {}
        exec(example, scope)  # the card's own usage example, as written: it defines its image too
        assert len(scope["out"].images) == 1 and (tmp_path / "counterfactual.png").is_file()


def test_shipped_cards_render_with_the_content_they_have():
    for name in ("diffscm-mnist", "diffscm-morphomnist"):
        committed = (CHECKPOINTS / name / "README.md").read_text()
        card = str(model_cards.render_model_card(CHECKPOINTS / name))
        assert card.endswith(committed[committed.index("## Training data") :])  # data, commands, scores, evaluation
        assert "its code files (pipeline_diffscm.py, classifier/anticausal.py)\nimport the installed package" in card


def test_a_card_names_the_code_a_folder_lacks(tmp_path):
    folder = tmp_path / "diffscm-mnist"
    shutil.copytree(MNIST, folder)
    (folder / "classifier" / "anticausal.py").unlink()
    card = str(model_cards.render_model_card(folder))
    assert "does not hold it yet (missing: pipeline_diffscm.py, classifier/anticausal.py)" in card
    assert model_cards.installed_code_shims(folder) == ["pipeline_diffscm.py"]


def test_a_loaded_and_changed_pipeline_saved_over_its_folder_keeps_its_records(tmp_path):
    folder = tmp_path / "diffscm-mnist"
    shutil.copytree(MNIST, folder)
    DiffSCMPipeline.from_pretrained(folder, guidance_scale=8.0).save_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert "`guidance_scale` 8.0: anti-causal guidance;" in card and model_cards.missing_remote_code(folder) == []
    assert card.count("accelerate launch training_scripts/") == 2 and "| 999 | 0.094 |" in card
    assert (MNIST / "evaluation.md").read_text() in card and "Not recorded" not in card


@pytest.fixture(scope="module")
def pushed(saved, tmp_path_factory):
    """The hand-built folders and the shipped MNIST one (no code in it) pushed to a fake Hub that copies every upload
    into a Hugging Face cache; returns the cache, the URLs and the MNIST folder's files before the push."""
    root = tmp_path_factory.mktemp("hub")
    before = {path: path.read_bytes() for path in MNIST.rglob("*") if path.is_file()}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        hub_cache_with(Path(folder_path), root, repo_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
        patch.setattr(HfApi, "upload_folder", upload_folder)
        urls = {name: hub.push_to_hub(folder, f"someone/diffscm-{name}") for name, (folder, _) in saved.items()}
        urls["mnist"] = hub.push_to_hub(str(MNIST), "someone/diffscm-mnist", token="hf_fake", private=True)
    return root / "hub", urls, before


def snapshot(cache: Path, repo_id: str) -> Path:
    (folder,) = (cache / ("models--" + repo_id.replace("/", "--")) / "snapshots").iterdir()
    return folder


def test_pushed_pipelines_load_by_hub_id_offline_with_both_loaders(pushed, saved, tmp_path):
    cache, urls, _ = pushed
    assert urls["mnist"] == "https://huggingface.co/someone/diffscm-mnist"
    expected = {name: output for name, (_, output) in saved.items()}
    expected["mnist"] = run(DiffSCMPipeline.from_pretrained(MNIST), "mnist")
    for name, output in expected.items():
        pipe = DiffSCMPipeline.from_pretrained(f"someone/diffscm-{name}", cache_dir=str(cache))
        torch.testing.assert_close(run(pipe, name), output)
        assert f'from_pretrained("someone/diffscm-{name}")' in (snapshot(cache, f"someone/diffscm-{name}") /
                                                                  "README.md").read_text()  # fmt: skip
    plain_diffusers([(f"someone/diffscm-{name}", name, None) for name in expected], tmp_path, HF_HUB_CACHE=str(cache))
    for name, output in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), output)


def test_pushing_a_folder_without_code_stages_code_and_card_and_leaves_it_alone(pushed):
    cache, _, before = pushed
    uploaded = snapshot(cache, "someone/diffscm-mnist")
    assert model_cards.missing_remote_code(uploaded) == []
    assert (uploaded / "scheduler" / "scheduler_config.json").is_file()
    for name in ("training.json", "evaluation.md"):
        assert (uploaded / name).read_bytes() == (MNIST / name).read_bytes()
    card = (uploaded / "README.md").read_text()
    assert card.startswith("---\n") and "# diffscm-mnist" in card and "Mechanism: **classifier-guided**" in card
    assert card.count("accelerate launch training_scripts/") == 2 and "## Evaluation\n\nMeasured with" in card
    assert 'DiffusionPipeline.from_pretrained("someone/diffscm-mnist", trust_remote_code=True)' in card
    assert json.loads((uploaded / "model_index.json").read_text())["guidance_scale"] == 12.0
    assert {path: path.read_bytes() for path in MNIST.rglob("*") if path.is_file()} == before


def test_push_to_hub_names_what_is_wrong_before_uploading(tmp_path, saved, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("nothing may reach the Hub")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    for repo_id in (None, ""):
        with pytest.raises(ValueError, match="needs a Hub repo id such as 'your-name/diffscm-mnist'"):
            hub.push_to_hub(saved["guided"][0], repo_id)
    with pytest.raises(FileNotFoundError, match="No such pipeline folder: '.*missing'"):
        hub.push_to_hub(tmp_path / "missing", "someone/x")
    with pytest.raises(ValueError, match="not a DiffSCMPipeline folder: it has no model_index.json"):
        hub.push_to_hub(tmp_path, "someone/x")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["a", "b"]}))
    with pytest.raises(ValueError, match="holds a DDPMPipeline pipeline, not a DiffSCMPipeline"):
        hub.push_to_hub(tmp_path, "someone/x")


def test_the_pipelines_own_push_to_hub_uploads_the_project_card_and_code(tmp_path, monkeypatch):
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded[repo_id] = {path.relative_to(folder_path).as_posix(): path.read_bytes()
                             for path in Path(folder_path).rglob("*") if path.is_file()}  # fmt: skip
        uploaded[repo_id, "options"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    pipe = DiffSCMPipeline.from_pretrained(MNIST)
    assert pipe.push_to_hub("someone/diffscm-mnist") == "https://huggingface.co/someone/diffscm-mnist"
    files = uploaded["someone/diffscm-mnist"]
    card = files["README.md"].decode()
    assert "Mechanism: **classifier-guided**" in card and "## Evaluation" in card, "the project's card, with records"
    assert files["training.json"] == (MNIST / "training.json").read_bytes()
    assert {"pipeline_diffscm.py", "folder.py", "checks.py", "classifier/anticausal.py"} <= set(files)
    pipe.push_to_hub("someone/pr", commit_message="New weights", create_pr=True)  # diffusers' keywords
    assert uploaded["someone/pr", "options"]["commit_message"] == "New weights"
    assert uploaded["someone/pr", "options"]["create_pr"] is True
    pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="someone/saved")
    assert uploaded["someone/saved"]["training.json"] == files["training.json"], "the same upload as push_to_hub"
    with pytest.raises(ValueError, match="plain safetensors"):
        pipe.push_to_hub("someone/x", safe_serialization=False)


def test_torch_dtype_reaches_every_component_and_abduction_stays_in_full_precision(tmp_path, saved):
    folder = tmp_path / "diffscm-all-components"
    torch.manual_seed(0)
    DiffSCMPipeline(
        tiny_unet(class_embed_type="identity"), DDIMScheduler(clip_sample=False), tiny_predictor(),
        tiny_parent_embedding(), causal_graph=TINY_GRAPH, guidance_scale={"position": 1.0}, num_inference_steps=3,
    ).save_pretrained(folder)  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert {name: pipe.components[name].dtype for name in ("unet", "classifier", "parent_embedding")} == dict.fromkeys(
        ("unet", "classifier", "parent_embedding"), torch.bfloat16
    )
    factual = {"brightness": 0.7, "position": [0, 1]}
    assert pipe.abduct(images(), factual).noise.dtype == pipe.state_dtype == torch.float64
    out = pipe(images(), intervention={"position": 1}, factual_values={"brightness": 0.7}, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    guided = DiffSCMPipeline.from_pretrained(saved["guided"][0], torch_dtype=torch.bfloat16)
    guided.set_progress_bar_config(disable=True)
    assert guided.unet.dtype == guided.classifier.dtype == torch.bfloat16
    assert torch.isfinite(guided(images(), target=[1, 0], output_type="pt").images).all()
    per_component = DiffSCMPipeline.from_pretrained(folder, torch_dtype={"unet": torch.bfloat16})
    assert per_component.unet.dtype == torch.bfloat16 and per_component.classifier.dtype == torch.float32
