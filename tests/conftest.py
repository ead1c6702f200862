import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny CLIP, SD and SDXL saved once per session with save_pretrained."""
    from pickalign.align.tiny import build_tiny_sd, build_tiny_sdxl
    from pickalign.reward.tiny import build_tiny_clip

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "sd": build_tiny_sd(root / "sd"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
    }


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> Path:
    """A small renders-only toy dataset in the Pick-a-Pic schema (16 train prompts x 2 pairs)."""
    from pickalign.eval.toy.data import generate_toy_dataset

    out = tmp_path_factory.mktemp("toy_pairs")
    generate_toy_dataset(
        out, seed=0, prompts=16, pairs_per_prompt=2, eval_pairs_per_prompt=1, base_models={}
    )
    return out


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without the accelerate state an earlier in-process run left behind."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def jpeg_bytes(image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def launch(config: str, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` a script with one of the repo's accelerate configs."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        script,
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def tiny_evaluation(tiny_models, tmp_path_factory) -> Path:
    """One small evaluation (3 tiny-SD models x 3 prompts x 2 seeds, tests.test_eval's config),
    shared read-only by the evaluation and arena tests."""
    from pickalign.eval.suite import evaluate
    from tests.test_eval import write_config

    tmp_path = tmp_path_factory.mktemp("tiny_evaluation")
    return evaluate(eval_config(write_config(tmp_path, tiny_models)), progress=False).parent


def eval_config(path: Path, *overrides: str):
    """The evaluation config at ``path`` with ``--FIELD VALUE`` overrides, read as every command
    reads a config."""
    from pickalign.config import parse_config
    from pickalign.eval.suite import EvalConfig

    return parse_config(EvalConfig, ["--config", str(path), *overrides])


def require_system(available: bool, what: str, install: str) -> None:
    """A test that needs a system package skips without it, and fails under `make test`
    (PICKALIGN_REQUIRE_SYSTEM=1), which installs it."""
    if available:
        return
    if os.environ.get("PICKALIGN_REQUIRE_SYSTEM"):
        pytest.fail(f"{what} is needed: apt-get install {install}")
    pytest.skip(f"{what} is not installed (make test installs it)")


def require_postgres() -> None:
    found = list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    require_system(bool(found), "PostgreSQL", "postgresql")


def chrome(scratch: Path):
    """Debian's Chromium, headless, through ChromeDriver; its temporary files (the singleton
    socket folders it leaves behind) go under ``scratch``, not /tmp."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require_system(
        bool(chromium and driver), "Chromium with ChromeDriver", "chromium chromium-driver"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    service = Service(driver, env={**os.environ, "TMPDIR": str(scratch)})
    return webdriver.Chrome(service=service, options=options)
