"""The house's floors (fspo_ray.FLOORS) hold: every import in fspo_ray, at module level or inside a
function, goes to the importer's floor or a lower one, and no two parts import each other."""

import ast
import pkgutil
from pathlib import Path

import fspo_ray

PACKAGE = Path(fspo_ray.__file__).parent
FLOOR_OF = {part: level for level, parts in enumerate(fspo_ray.FLOORS) for part in parts}


def part_of(module: str) -> str | None:
    """The floor plan's part a module belongs to (its longest listed prefix), or None outside fspo_ray."""
    pieces = module.split(".")
    for n in range(len(pieces), 0, -1):
        if ".".join(pieces[:n]) in FLOOR_OF:
            return ".".join(pieces[:n])
    return None


def imports(package: Path = PACKAGE) -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every fspo_ray import in the package's source."""
    found = []
    for info in pkgutil.walk_packages([str(package)], prefix="fspo_ray."):
        path = package.joinpath(*info.name.split(".")[1:])
        path = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fspo_ray"):
                names = [node.module] if node.module != "fspo_ray" else [f"fspo_ray.{a.name}" for a in node.names]
                found += [(info.name, name, node.lineno) for name in names]
            elif isinstance(node, ast.Import):
                found += [(info.name, a.name, node.lineno) for a in node.names if a.name.startswith("fspo_ray")]
    return found


def test_every_module_is_on_a_floor():
    unplaced = [info.name for info in pkgutil.walk_packages([str(PACKAGE)], prefix="fspo_ray.")
                if part_of(info.name) is None]  # fmt: skip
    assert unplaced == [], "add these to fspo_ray.FLOORS"


def test_no_import_runs_up_a_floor():
    upward = [f"{src}:{line} imports {dst} ({part_of(src)} is on floor {FLOOR_OF[part_of(src)]}, "
              f"{part_of(dst)} on {FLOOR_OF[part_of(dst)]})"
              for src, dst, line in imports() if FLOOR_OF[part_of(dst)] > FLOOR_OF[part_of(src)]]  # fmt: skip
    assert upward == []


def test_no_two_parts_import_each_other():
    edges = {(part_of(src), part_of(dst)) for src, dst, _ in imports() if part_of(src) != part_of(dst)}
    assert sorted((a, b) for a, b in edges if (b, a) in edges) == []


def test_the_walk_sees_an_import_inside_a_function(tmp_path):
    import shutil

    copy = tmp_path / "fspo_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "losses.py", "a") as f:
        f.write("\n\ndef planted():\n    from fspo_ray.train.run import run_training\n")
    assert ("fspo_ray.losses", "fspo_ray.train.run") in {(src, dst) for src, dst, _ in imports(copy)}
