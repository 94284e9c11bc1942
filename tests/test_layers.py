"""The layering the README's "Files" diagram draws: every top-level file sits in one layer and imports only files of
its own layer or of the layers below it (the model files at the bottom import no program, no disk code)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # bottom first, as the README's diagram reads from the bottom up
    ("model", {"schedulers", "text_encoder", "unet", "vae", "style_encoder", "style_stats", "clue", "lora"}),
    ("our format", {"checkpoint"}),
    ("shared", {"data", "cli"}),
    ("public formats", {"convert"}),
    ("program parts", {"training_state", "classifier", "inception"}),
    ("programs", {"train", "sample", "eval"}),
]


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every import in the file, lazy ones inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_file_imports_only_its_layer_and_the_ones_below():
    layer_of = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
    files = {p.stem for p in ROOT.glob("*.py")}
    assert files == set(layer_of), f"place new files in a layer (and in the README's diagram): {files ^ set(layer_of)}"
    upward = [f"{name}.py ({LAYERS[layer_of[name]][0]}) imports {dep}.py ({LAYERS[layer_of[dep]][0]})"
              for name in sorted(files) for dep in sorted(imported_modules(ROOT / f"{name}.py") & files)
              if layer_of[dep] > layer_of[name]]
    assert not upward, upward
