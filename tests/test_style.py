"""ruff keeps the format (line length 119, pyproject.toml); the test command checks it too."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (requirements.txt installs it)")
    result = subprocess.run([ruff, *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_face_is_lazy():
    """Floor-one modules (the causal graph, the data) import without diffusers; the public names still resolve."""
    code = (
        "import sys, diffscm.scm, diffscm.data; assert 'diffusers' not in sys.modules, 'eager'; "
        "from diffscm import CausalGraph, DiffSCMPipeline; assert 'diffusers' in sys.modules; "
        "import diffscm; assert 'DiffSCMPipeline' in dir(diffscm)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    import diffscm

    with pytest.raises(AttributeError, match="no attribute 'Pipeline'"):
        diffscm.Pipeline  # noqa: B018
