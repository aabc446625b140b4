"""Every tutorial notebook runs top to bottom, headless, in quick mode (CRYO_FORUM_QUICK=1)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# what each tutorial leaves in its working folder when it ran to the end
PRODUCTS = {
    "01_quickstart": ["run/model.keras", "predicted.star", "kept.star", "report/metrics.json", "montage.png"],
    "02_real_data": [
        "job/consensus.star",
        "run/reference.mrc",
        "run/pretrain/model.keras",
        "run/predicted.star",
        "run/kept.star",
        "run/kept_fsc/fsc.json",
        "cryosparc_P1/J20/J20_particles.cs",
    ],
    "03_symmetry": ["symmetry/d2_map.mrc"],
    "04_uncertainty": ["run/calibration.json", "predicted.star", "kept.star", "kept70.star"],
    "05_design_choices": ["design_choices.csv", "design_choices.png", "runs/pooling_max/seed0/record.json"],
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    monkeypatch.setenv("CRYO_FORUM_QUICK", "1")
    monkeypatch.setenv("CRYO_FORUM_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend embeds the figures
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = sum(
        1
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )
    assert images >= 1, "a tutorial should show at least one figure"
    work = tmp_path / "work"
    for product in PRODUCTS[path.stem]:
        assert (work / product).exists(), f"{path.stem} did not write {product}"
    streams = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []) if "text" in output
    )
    assert "Traceback" not in streams
