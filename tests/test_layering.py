"""Architecture rules that code review would otherwise have to remember."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).parent.parent / "diffalign"
FAMILY_WORDS = re.compile(r"sdxl|sd15|sd1\.|stable.?diffusion|time_ids|tokeni[sz]er|text_encoder|vae|pooled",
                          re.IGNORECASE)


def identifiers(path: Path) -> set[str]:
    """Every name the code uses: variables, attributes, keywords, imports (not docs or help strings)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names.update(n for n in (getattr(node, "id", None), getattr(node, "attr", None), getattr(node, "arg", None),
                                 getattr(node, "module", None), getattr(node, "name", None)) if isinstance(n, str))
    return names


def test_methods_and_losses_never_name_a_model_family():
    files = [PKG / "losses.py", *sorted((PKG / "methods").glob("*.py"))]
    offenders = [f"{f.name}: {name}" for f in files for name in sorted(identifiers(f)) if FAMILY_WORDS.search(name)]
    assert not offenders, "model-family knowledge in methods/losses:\n" + "\n".join(offenders)
    assert "pooled" in {n for n in identifiers(PKG / "models" / "base.py")}   # the check does see identifiers


def test_methods_and_losses_never_do_schedule_algebra_or_name_the_network():
    """What `grep -rnE "alpha_bar|alphas_cumprod|sigma|unet" diffalign/methods diffalign/losses.py` checks, on the
    code's identifiers: the schedule owns the noise arithmetic and the family owns the denoiser."""
    words = re.compile(r"alpha_bar|alphas_cumprod|sigma|unet|abar", re.IGNORECASE)
    files = [PKG / "losses.py", *sorted((PKG / "methods").glob("*.py"))]
    offenders = [f"{f.name}: {name}" for f in files for name in sorted(identifiers(f)) if words.search(name)]
    assert not offenders, "schedule or network knowledge in methods/losses:\n" + "\n".join(offenders)
    raw = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
           if re.search(r"alpha_bar|alphas_cumprod|sigma|unet", line)]
    assert not raw, raw
    assert "alphas_cumprod" in identifiers(PKG / "models" / "schedules.py")      # the check does see them


def test_only_the_trainer_imports_accelerate():
    users = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
                   if re.search(r"^\s*(from|import) accelerate", p.read_text(), re.MULTILINE))
    assert users == ["trainer.py"]


def test_no_unchecked_pickle_loads():
    for path in PKG.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
