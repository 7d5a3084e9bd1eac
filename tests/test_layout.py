"""The package's walls (DESIGN: the dependency directions the layout promises), read from every import statement of
fac/, those inside functions too: the model imports nothing of fac above it, the data half needs no model, and
training never imports evaluation (a helper both need lives in the lower of the two)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Layer -> the fac layers it may import. The shared bottom (atomic writes, fault points, devices) is below them all.
BOTTOM = {"atomic", "faults", "devices"}
ALLOWED = {
    "model": set(),
    "data": {"atomic", "faults"},
    "train": BOTTOM | {"model", "data"},
    # Evaluation reads the training data's records (fac.train.data) and the stages' tokenizer loader.
    "eval": BOTTOM | {"model", "data", "train"},
}


def fac_imports(path: Path) -> set[str]:
    """The fac layers (fac.<layer>...) one module imports, at any depth of its code."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"fac.{a.name}" for a in node.names] if node.module == "fac" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        layers |= {name.split(".")[1] for name in names if name.startswith("fac.")}
    return layers


def test_each_layer_imports_only_the_layers_below_it():
    crossings = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / "fac" / layer).rglob("*.py")):
            crossings += [f"{path.relative_to(ROOT)} imports fac.{other}"
                          for other in sorted(fac_imports(path) - allowed - {layer})]
    assert crossings == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fac.eval.metrics import answers\n    import fac.train.dpo\n"
                      "from fac import atomic\n")
    assert fac_imports(module) == {"eval", "train", "atomic"}
