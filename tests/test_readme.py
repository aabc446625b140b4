"""The README's Layout section is the map of the package: every module is on it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") : readme.index("## Development")]
    modules = [path for path in (ROOT / "src" / "cryo_forum").rglob("*.py") if path.name != "__init__.py"]
    assert len(modules) > 50
    missing = [str(path.relative_to(ROOT)) for path in modules if not re.search(rf"\b{path.stem}\b", layout)]
    assert not missing, f"not on the README's Layout: {missing}"
