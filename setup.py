from setuptools import setup

setup(
    name="diffscm",
    version="0.1.0",
    description="Counterfactual images with diffusion models (Diff-SCM) as a Hugging Face diffusers extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"diffscm": "src/diffscm", "diffscm.pipelines": "pipelines", "diffscm.model_cards": "model_cards"},
    packages=["diffscm", "diffscm.models", "diffscm.evaluation", "diffscm.pipelines", "diffscm.model_cards"],
    package_data={"diffscm.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.6",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.19",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "numpy",
        "Pillow",
        "tqdm",
        "mlxtend",
    ],
    extras_require={"test": ["pytest", "ruff", "mlxtend"]},
    entry_points={"console_scripts": ["diffscm = diffscm.cli:main"]},
)
