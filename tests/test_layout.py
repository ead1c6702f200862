import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

# The rooms, from the ground floor up: a module imports only from its own room or lower ones.
ROOMS = [
    ("pickalign.config", REPO / "pickalign" / "config.py"),
    ("pickalign.runtime", REPO / "pickalign" / "runtime.py"),
    ("pickalign.reward", REPO / "reward"),
    ("pickalign.align", REPO / "align"),
    ("pickalign.eval", REPO / "eval"),
    ("pickalign.cli", REPO / "pickalign" / "cli.py"),
]
# Rooms inside eval/ that import eval's suite but never each other.
SIDE_ROOMS = ["pickalign.eval.arena", "pickalign.eval.toy"]


def _module_name(path: Path) -> str:
    for name, place in ROOMS:
        if path == place or place in path.parents:
            parts = path.relative_to(place).with_suffix("").parts if place.is_dir() else ()
            parts = parts[:-1] if parts and parts[-1] == "__init__" else parts
            return ".".join((name, *parts))
    raise AssertionError(f"{path} is in no room")


def _imports() -> dict[str, set[str]]:
    """Every pickalign module of a room -> the pickalign modules it imports (anywhere in it)."""
    found = {}
    for _, place in ROOMS:
        for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
            module, names = _module_name(path), set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
            found[module] = {n for n in names if n.split(".")[0] == "pickalign"}
    return found


def _room(module: str) -> int:
    ranks = [
        i for i, (name, _) in enumerate(ROOMS) if module == name or module.startswith(name + ".")
    ]
    return max(ranks)


def test_one_namespace_resolves_to_the_repository_folders():
    import pickalign
    import pickalign.align
    import pickalign.eval
    import pickalign.reward

    assert pickalign.__version__ and Path(pickalign.__file__).parent == REPO / "pickalign"
    for package, folder in ((pickalign.reward, "reward"), (pickalign.align, "align")):
        assert Path(package.__file__).parent == REPO / folder
    assert Path(pickalign.eval.__file__).parent == REPO / "eval"
    assert pickalign.PickScore.__module__ == "pickalign.reward.pickscore"
    for path in REPO.rglob("*.py"):
        if {".venv", ".cache", "outputs"}.isdisjoint(path.relative_to(REPO).parts):
            text = path.read_text()
            bare = re.findall(r"^\s*(?:from|import) (?:reward|align|eval)\b", text, flags=re.M)
            assert not bare, f"{path}: import through pickalign (from pickalign.reward import ...)"


def test_imports_run_one_way_between_rooms_without_circles():
    imports = _imports()
    modules = set(imports)
    for module, names in imports.items():
        for name in names:
            target = name if name in modules else name.rpartition(".")[0]
            if target not in modules or target == module:
                continue  # a name inside a module, or pickalign's own __init__
            assert _room(target) <= _room(module), f"{module} imports {target}, a room above it"
            for side in SIDE_ROOMS:
                if target.startswith(side + "."):
                    assert module.startswith(side + ".") or _room(module) > _room(target), (
                        f"{module} imports {target}: the arena and the toy tools are rooms of "
                        "their own"
                    )
    graph = {
        m: {n if n in modules else n.rpartition(".")[0] for n in names} & modules - {m}
        for m, names in imports.items()
    }

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules that import each other in a loop: {circles}"


def test_importing_reward_does_not_import_diffusers():
    code = (
        "import sys, pickalign.reward, pickalign.reward.data, pickalign.runtime,"
        " pickalign.reward.tiny, pickalign.reward.tokenizer, pickalign.reward.pickscore,"
        " pickalign.reward.losses, pickalign.reward.evaluate, pickalign.reward.train,"
        " pickalign.reward.toyworld, pickalign.reward.registry;"
        "bad = [m for m in ('diffusers', 'peft', 'pickalign.align', 'pickalign.eval')"
        " if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_align_does_not_import_eval():
    modules = [p.stem for p in (REPO / "align").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys;"
        f"[importlib.import_module('pickalign.align.' + m) for m in {modules!r}];"
        "assert not [m for m in sys.modules if m.startswith('pickalign.eval')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_accelerate_configs_parse_and_say_what_they_were_tested_with():
    configs = sorted((REPO / "accelerate_configs").glob("*.yaml"))
    names = {c.stem for c in configs}
    assert {"single_gpu", "multi_gpu", "zero2", "zero3", "cpu_2proc"} <= names
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and "Tested with" in text, path.name
        config = yaml.safe_load(text)
        assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED"), path.name
    assert yaml.safe_load((REPO / "accelerate_configs/zero3.yaml").read_text())["deepspeed_config"][
        "zero3_save_16bit_model"
    ]


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci/run").read_text()


def test_every_shipped_recipe_config_parses():
    """Each YAML under recipes/configs loads into its recipe's config class without unknown keys."""
    from pickalign.align.ddpo import DDPOConfig
    from pickalign.align.dpo import DPOConfig
    from pickalign.align.reward_weighted import RewardWeightedConfig
    from pickalign.config import parse_config
    from pickalign.eval.arena.config import ArenaConfig
    from pickalign.eval.suite import EvalConfig
    from pickalign.eval.toy.clip import ToyClipConfig
    from pickalign.eval.toy.judge import ToyJudgeConfig
    from pickalign.eval.toy.pretrain import PretrainToyConfig
    from pickalign.reward.train import RewardConfig

    classes = {
        "toy": PretrainToyConfig,
        "reward": RewardConfig,
        "dpo": (DPOConfig, ToyJudgeConfig),
        "ddpo": (DDPOConfig, ToyJudgeConfig),
        "reward_weighted": (RewardWeightedConfig, ToyJudgeConfig),
    }
    configs = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        assert path.read_text().startswith("#") and "Launch" in path.read_text(), path
        if path.parent.name == "arena":
            config = parse_config(ArenaConfig, ["--config", str(path)])
            assert config.images_dir.startswith("outputs/"), path
            continue
        if path.parent.name == "eval":
            config = parse_config(EvalConfig, ["--config", str(path)])
            assert config.output_dir.startswith("outputs/"), path
            continue
        kind = ToyClipConfig if path.name == "clip.yaml" else classes[path.parent.name]
        config = parse_config(kind, ["--config", str(path)])
        config = config[0] if isinstance(config, tuple) else config
        assert config.output_dir.startswith("outputs/"), path
