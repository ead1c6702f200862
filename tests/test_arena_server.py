"""The arena as raters meet it: a real server process under load (SQLite and PostgreSQL), killed
mid-load, and clicked through in headless Chromium; the export then trains a reward."""

import os
import signal
import threading
import time

import pytest

from bench.arena_load import (
    PostgresServer,
    free_port,
    rater,
    run_load,
    start_server,
    stored_uids,
    write_arena_config,
)
from tests.conftest import chrome, require_postgres

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_fifty_raters_lose_and_duplicate_no_judgment(tiny_evaluation, tmp_path, backend):
    if backend == "postgres":
        require_postgres()
    postgres = PostgresServer() if backend == "postgres" else None
    database = postgres.__enter__() if postgres else f"sqlite:///{tmp_path / 'arena.db'}"
    try:
        config = write_arena_config(tmp_path, tiny_evaluation, database, per_minute=200)
        port = free_port()
        server = start_server(config, port, tmp_path / "server.log")
        try:
            result = run_load(f"http://127.0.0.1:{port}", raters=50, judgments=20)
        finally:
            server.terminate()
            server.wait(30)
        stored = stored_uids(database)
    finally:
        if postgres:
            postgres.__exit__(None, None, None)
    assert result["errors"] == [] and len(result["acknowledged"]) == 1000
    assert sorted(stored) == sorted(result["acknowledged"])  # none lost, none twice


def test_a_killed_server_keeps_every_acknowledged_judgment(tiny_evaluation, tmp_path):
    database = f"sqlite:///{tmp_path / 'arena.db'}"
    config = write_arena_config(tmp_path, tiny_evaluation, database, per_minute=1000)
    port = free_port()
    server = start_server(config, port, tmp_path / "server.log")
    acknowledged, latencies, errors = [], [], []
    threads = [
        threading.Thread(
            target=rater,
            args=(f"http://127.0.0.1:{port}", 200, acknowledged, latencies, errors),
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.pid, signal.SIGKILL)  # mid-load: requests are in flight
    server.wait(30)
    for thread in threads:
        thread.join(60)
    assert len(errors) == 20  # every rater was cut off
    stored = set(stored_uids(database))
    assert len(acknowledged) >= 150 and set(acknowledged) <= stored


def test_a_rater_clicks_ten_judgments_in_chromium_and_the_export_trains_a_reward(
    tiny_models, tmp_path
):
    import yaml
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from pickalign.eval.arena.export import export, split_of
    from pickalign.eval.arena.store import all_judgments, open_engine
    from pickalign.reward.data import load_pickapic
    from pickalign.reward.toyworld import prompt_splits
    from pickalign.reward.train import RewardConfig, train

    # prompts that land in each export split (validation and test a third each)
    wanted, prompts = ["train", "train", "validation", "test"], []
    for attributes in prompt_splits()["train"]:
        split = split_of(attributes.prompt, 0.3, 0.3)
        if split in wanted:
            wanted.remove(split)
            prompts.append(attributes.prompt)
    database = f"sqlite:///{tmp_path / 'arena.db'}"
    config = {
        "mode": "generate",
        "models": [{"name": "tiny-sd", "model": str(tiny_models["sd"])}],
        "steps": 2,
        "database": database,
        "images_dir": str(tmp_path / "images"),
        "validation_fraction": 0.3,
        "test_fraction": 0.3,
    }
    (tmp_path / "arena.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = start_server(tmp_path / "arena.yaml", port, tmp_path / "server.log")
    browser = chrome(tmp_path)
    keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN]
    choices = []
    try:
        browser.set_window_size(390, 844)  # a phone's width
        browser.get(f"http://127.0.0.1:{port}/")
        # before any prompt: no empty image frames (no pair yet), and no tie button to press
        shown_at_first = browser.execute_script(
            "return [...document.querySelectorAll('img, #pick-tie')]"
            ".filter(e => e.offsetParent !== null).length"
        )
        wait = WebDriverWait(browser, 30)
        count = 0
        for k in range(10):
            if k % 3 == 0:  # a new prompt every third judgment
                box = browser.find_element(By.ID, "prompt")
                box.clear()
                box.send_keys(prompts[(k // 3) % len(prompts)], Keys.ENTER)
                wait.until(
                    lambda b: not b.find_element(By.ID, "pick-left").get_attribute("disabled")
                )
            shown = browser.find_element(By.TAG_NAME, "body").get_attribute("data-shown")
            if k % 2:
                browser.find_element(By.TAG_NAME, "body").send_keys(keys[k % 3])
            else:
                browser.find_element(By.ID, ["pick-left", "pick-right", "pick-tie"][k % 3]).click()
            choices.append(["left", "right", "tie"][k % 3])
            count += 1
            wait.until(lambda b, n=count: b.find_element(By.ID, "count").text == str(n))
            wait.until(
                lambda b, s=shown: (
                    b.find_element(By.TAG_NAME, "body").get_attribute("data-shown") != s
                )
            )
        loaded = browser.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
        width = browser.execute_script("return document.documentElement.scrollWidth")
    finally:
        browser.quit()
        server.terminate()
        server.wait(30)
    assert shown_at_first == 0
    assert loaded and width <= 390  # no sideways scrolling on a phone
    engine = open_engine(database)
    stored = all_judgments(engine)
    assert [j["choice"] for j in stored] == choices
    sizes = export(engine, tmp_path / "images", tmp_path / "export", 0.3, 0.3)
    assert sizes["judgments"] == 10 and sizes["train"] + sizes["validation"] + sizes["test"] == 10
    assert min(sizes["validation_unique"], sizes["test_unique"]) >= 1
    exported = sum(
        len(load_pickapic(tmp_path / "export", s)) for s in ("train", "validation", "test")
    )
    assert exported == 10
    # the export trains a toy reward as it is, no conversion
    final = train(
        RewardConfig(
            from_scratch=True,
            image_size=32,
            dataset=str(tmp_path / "export"),
            output_dir=str(tmp_path / "reward"),
            batch_size=4,
            max_steps=4,
            warmup_steps=1,
            eval_steps=2,
            checkpointing_steps=0,
            report_to="none",
        )
    )
    assert (final / "config.json").exists()
