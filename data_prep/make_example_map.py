"""Rebuild the built-in example (src/cryo_forum/data/example.mrc and 1a28_chainA.pdb) from a PyPI sdist.

The atomic model is PDB entry 1A28 (human progesterone receptor ligand-binding domain), as shipped in the
MDAnalysisTests 2.11.0 source distribution (MDAnalysisTests/data/1a28.pdb.gz). Chain A (the biological unit
is a monomer) is kept without waters, ligands, hydrogens or alternative conformations, and its electron
scattering potential is computed with gemmi (cryo_forum.io.maps.load_volume) at 2 A/px in a 48^3 box.

Get the sdist first (the only download; nothing else is fetched):
  pip download --no-deps --no-binary :all: mdanalysistests==2.11.0 -d /tmp/sdist
then:
  python data_prep/make_example_map.py --sdist /tmp/sdist/mdanalysistests-2.11.0.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import tarfile
from pathlib import Path

import gemmi

from cryo_forum.io.atomic import atomic_output
from cryo_forum.io.maps import load_volume
from cryo_forum.io.mrc import write_volume

MEMBER = "mdanalysistests-2.11.0/MDAnalysisTests/data/1a28.pdb.gz"
SDIST_SHA256 = "5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea"
CHAIN = "A"
PIXEL_SIZE = 2.0
BOX = 48
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "cryo_forum" / "data"


def extract_chain(sdist: Path, model_out: Path) -> None:
    """Write chain A of 1A28 (protein atoms, first conformer) from the sdist to ``model_out`` (PDB)."""
    with tarfile.open(sdist) as archive:
        text = gzip.decompress(archive.extractfile(MEMBER).read()).decode()
    structure = gemmi.read_pdb_string(text)
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    structure.remove_alternative_conformations()
    for model in list(structure)[1:]:
        structure.remove_model(model.num)
    for name in [chain.name for chain in structure[0] if chain.name != CHAIN]:
        structure[0].remove_chain(name)
    structure.setup_entities()
    with atomic_output(model_out) as tmp:
        structure.write_pdb(str(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, required=True, help="mdanalysistests-2.11.0.tar.gz")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        print(f"warning: {args.sdist} has sha256 {digest}, expected {SDIST_SHA256}", file=sys.stderr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "1a28_chainA.pdb"
    extract_chain(args.sdist, model_path)
    volume, pixel_size = load_volume(model_path, pixel_size=PIXEL_SIZE, size=BOX)
    write_volume(args.out_dir / "example.mrc", volume, pixel_size)
    residues = sum(len(chain) for chain in gemmi.read_structure(str(model_path))[0])
    print(f"{model_path}: {residues} residues; {args.out_dir / 'example.mrc'}: {BOX}^3 at {pixel_size} A/px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
