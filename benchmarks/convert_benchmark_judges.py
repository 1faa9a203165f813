"""Convert the Morpho-MNIST benchmark's judges (Lightning .ckpt files) to safetensors.

Melistas et al. 2024, "Benchmarking Counterfactual Image Generation" (github.com/gulnazaki/counterfactual-benchmark,
MIT licence) scored every Morpho-MNIST model with three predictors trained in PyTorch Lightning. Their checkpoints
pickle Lightning metadata next to the weights; this script is the only place that unpickles them, and it keeps just
the `state_dict` tensors, which `diffscm.evaluation.benchmark_judges.BenchmarkJudges` loads without pickle:

    python benchmarks/convert_benchmark_judges.py --src /path/to/ckpts --out checkpoints/benchmark-judges

Each `<name>_classifier-epoch=NN.ckpt` in --src becomes `<name>.safetensors` in --out (name: thickness, intensity,
digit); the LICENSE file in --src, if any, is copied verbatim.
"""

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

JUDGES = ("thickness", "intensity", "digit")


def find_checkpoint(src: Path, name: str) -> Path:
    matches = sorted(src.glob(f"{name}_classifier*.ckpt"))
    if len(matches) != 1:
        raise SystemExit(f"error: expected one {name}_classifier*.ckpt in {src}, found {[m.name for m in matches]}")
    return matches[0]


def convert(src: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in JUDGES:
        ckpt = find_checkpoint(src, name)
        # Lightning checkpoints pickle their training state: only load these known files.
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        tensors = {key: value.detach().clone().contiguous() for key, value in state.items()}
        target = out / f"{name}.safetensors"
        # One metadata key: safetensors writes several in arbitrary order, and re-runs should give the same bytes.
        save_file(tensors, str(target), metadata={"source": ckpt.name})
        written.append(target)
        print(f"{ckpt.name} -> {target} ({len(tensors)} tensors)")
    if (src / "LICENSE").is_file():
        shutil.copyfile(src / "LICENSE", out / "LICENSE")
        written.append(out / "LICENSE")
    return written


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="folder holding the benchmark's .ckpt files")
    parser.add_argument("--out", type=Path, required=True, help="folder to write <judge>.safetensors into")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        raise SystemExit(f"error: --src {args.src} is not a folder")
    convert(args.src, args.out)


if __name__ == "__main__":
    main()
