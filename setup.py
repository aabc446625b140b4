"""Install cryo-forum: orientation estimation with uncertainty for cryo-EM particles."""

from setuptools import find_packages, setup

setup(
    name="cryo-forum",
    version="0.1.0",
    description="Amortised orientation estimation with Bingham uncertainty for single-particle cryo-EM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"cryo_forum": ["data/*.mrc", "data/*.pdb", "data/*.md", "data/*.txt"]},
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "mrcfile>=1.5",
        "h5py>=3.9",
        "pandas>=2.0",
        "matplotlib>=3.8",
        "starfile>=0.5",
        "gemmi>=0.6",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        # Quaternion and rotation-matrix ops. Its own dependencies include the discontinued tensorflow-addons,
        # which installs but no longer imports; cryo-forum never imports it (tests/test_install.py).
        "tensorflow-graphics==2021.12.3",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.5", "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29"],
    },
    entry_points={"console_scripts": ["cryo-forum=cryo_forum.cli:main"]},
)
