"""The source distribution carries everything the extension is compiled from: every file under
csrc/ (CUDA sources and headers too, whichever machine makes the sdist), so that a wheel built
from it elsewhere compiles."""
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked_sources():
    try:
        listed = subprocess.run(["git", "ls-files", "csrc"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    return {line for line in listed.stdout.splitlines() if line}


def test_sdist_holds_every_source_and_header(tmp_path):
    sources = tracked_sources()
    assert {"csrc/margin.h", "csrc/checks.h", "csrc/cuda/margin_softmax_kernel.cu"} <= sources
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(sources - packed)
    assert not missing, f"the sdist lacks {missing}: see MANIFEST.in"
    assert "README.md" in packed and "arcface_ext/functional.py" in packed
