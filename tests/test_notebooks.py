"""The notebooks in experiments/notebooks/ run top to bottom with SMALL on, and are committed without outputs.

Each notebook runs in its own Jupyter kernel (nbclient, the engine under nbmake and papermill) in a
temporary directory, on the CPU, as a user would run it; a failing cell fails the test with the
cell's source and traceback. These tiny runs are compile-bound, so the kernels compile at XLA's
lowest backend optimisation level (~3x faster compiles, slower steps: the same programs) and share
one persistent compilation cache (the notebooks build some of the same models and steps).
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "experiments", "notebooks", "*.ipynb")))
REQUIRES = {"your_own_model.ipynb": ("torch", "transformers")}  # beyond jaxlm's own dependencies
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "post_training.ipynb", "your_own_model.ipynb", "reasoning_grpo.ipynb"} <= set(
        map(os.path.basename, NOTEBOOKS))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebook_compilation_cache"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_outputs_are_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path}: cell {i} has outputs; clear them before committing (Jupyter: Edit > Clear All Outputs)"
        assert "execution" not in cell.metadata, f"{path}: cell {i} keeps execution timings in its metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, compilation_cache):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in REQUIRES.get(os.path.basename(path), ()):
        pytest.importorskip(module)
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "JAXLM_SMALL": "1", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": compilation_cache,
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{os.path.basename(path)}: {ANSI.sub('', str(error))}", pytrace=False)
