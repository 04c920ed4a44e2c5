"""plugtune ui driven in a real headless Chromium (Debian's, through Playwright's Python package).

One `plugtune ui` process on a free loopback port serves a tiny random model and two adapters
(a, b). The page: streams a chat (checked against the server's own non-streamed answer), switches
adapters, answers side by side, refuses a bad form value beside its field, starts a 3-step training
run from the form, is closed and reopened while the run goes on, shows the run's curves and
checkpoints, loads its adapter into the playground, continues the run with more steps, stops and
resumes a longer one, overlays two runs' curves, renders a compare report and merges an adapter in
the background. A run started from the page gives the same adapter bytes as `plugtune train` with
the same settings. Screenshots of each part are checked: the expected elements are visible and the
picture is not blank. PLUGTUNE_UI_SCREENSHOTS=DIR also keeps them there (docs/ui for the README).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import plugtune
from plugtune.adapters import adapter_state, attach_adapter, save_adapter

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package only)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (os.environ.get("PLUGTUNE_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and os.path.isfile(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                                         "chromium; .ci/run installs it)")
RUN_SETTINGS = {"adapter.r": "4", "data.train": "train.jsonl", "data.max_length": "64", "training.max_steps": "3",
                "training.batch_size": "4", "training.lr": "0.01", "training.save_every": "1"}
MORE = "training.threads=1\ntraining.warmup_steps=0"


def make_adapter(base_dir, out, name, seed):
    lm = plugtune.load(str(base_dir))
    attach_adapter(lm.model, "lora", {"r": 4}, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(lm.model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(lm.model, out, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PLUGTUNE_DEBUG": "1"}


@pytest.fixture(scope="module")
def ui(tiny_model_dir, tmp_path_factory):
    top = tmp_path_factory.mktemp("ui")
    for seed, name in enumerate("ab", start=1):
        make_adapter(tiny_model_dir, top / "adapters" / name, name, seed)
    make_adapter(tiny_model_dir, top / "runs" / "library" / "c", "c", 3)  # loadable from the page
    (top / "data").mkdir()
    rows = [{"instruction": f"say {i}", "output": f"{i} {i} {i}"} for i in range(24)]
    (top / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = free_port()
    log = open(top / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "plugtune.cli", "ui", "--model", str(tiny_model_dir),
                             "--adapter", f"a={top / 'adapters' / 'a'}", "--adapter", f"b={top / 'adapters' / 'b'}",
                             "--runs-dir", str(top / "runs"), "--data-dir", str(top / "data"), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"],
                            cwd=top, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("plugtune ui did not start:\n" + (top / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    yield {"url": url, "top": top, "model": tiny_model_dir}
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, ui):
    pg = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(ui["url"] + "/ui/")
    pg.wait_for_selector("#model-select option", state="attached")
    pg.errors = errors
    yield pg
    pg.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def reference_answer(ui, model, prompt):
    r = httpx.post(ui["url"] + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                         "top_p": 1, "top_k": 0, "max_tokens": 64})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def tab(page, name):
    page.click(f'#tabs button[data-tab="{name}"]')
    page.wait_for_selector(f"#tab-{name}", state="visible")


def chat(page, model, prompt):
    page.click("#chat-reset")
    page.select_option("#model-select", model)
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    page.wait_for_selector('#chat-log .msg.assistant[data-done="1"]', timeout=60_000)
    msg = page.locator("#chat-log .msg.assistant").last
    return msg, msg.locator(".text").inner_text()


def screenshot(page, name, tmp_path, must_see):
    """Save a screenshot (and keep it under $PLUGTUNE_UI_SCREENSHOTS); check it shows what it should."""
    from PIL import Image, ImageStat

    for selector in must_see:
        assert page.locator(selector).first.is_visible(), f"{name}: {selector} is not visible"
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    image = Image.open(path).convert("L")
    assert image.size == (1280, 900)
    assert ImageStat.Stat(image).var[0] > 100, f"{name}: the screenshot is (almost) blank"
    keep = os.environ.get("PLUGTUNE_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / f"{name}.png")
    return path


def wait_state(page, wanted, timeout_s=120):
    page.wait_for_function("(w) => w.includes(document.querySelector('#run-state').textContent)", arg=wanted,
                           timeout=timeout_s * 1000)
    return page.inner_text("#run-state")


# The playground ------------------------------------------------------------------------------------
def test_chat_streams_the_servers_answer_and_switches_adapters(page, ui, tmp_path):
    msg, text = chat(page, "a", "say 7")
    assert text == reference_answer(ui, "a", "say 7") and text.strip()
    assert msg.get_attribute("data-adapter") == "a" and int(msg.get_attribute("data-chunks")) >= 1
    msg_b, text_b = chat(page, "b", "say 7")
    assert msg_b.get_attribute("data-adapter") == "b"
    assert text_b == reference_answer(ui, "b", "say 7") and text_b != text
    screenshot(page, "playground", tmp_path, ["#chat-log .msg.assistant", "#model-select", "#temperature", "#loaded-list li"])


def test_side_by_side_streams_every_ticked_model(page, ui, tmp_path):
    base = page.locator("#model-select option").first.get_attribute("value")
    for model in (base, "a", "b"):
        page.check(f'#sbs-models input[value="{model}"]')
    page.fill("#sbs-input", "say 3")
    page.click("#sbs-send")
    page.wait_for_function("document.querySelectorAll('#sbs-columns .sbs-col[data-done=\"1\"]').length === 3",
                           timeout=60_000)
    for model in (base, "a", "b"):
        col = page.locator(f'#sbs-columns .sbs-col[data-model="{model}"]')
        assert col.locator(".sbs-text").inner_text() == reference_answer(ui, model, "say 3")
    screenshot(page, "side_by_side", tmp_path, ["#sbs-columns .sbs-col"])


def test_load_and_unload_adapters_from_the_page(page, ui):
    item = page.locator('#adapter-list li', has_text="library/c")
    item.locator("input").fill("c")
    item.locator(".load-btn").click()
    page.wait_for_selector('#loaded-list li[data-name="c"]')
    _, text = chat(page, "c", "say 2")
    assert text == reference_answer(ui, "c", "say 2")
    page.locator('#loaded-list li[data-name="c"] .unload-btn').click()
    page.wait_for_function("!Array.from(document.querySelectorAll('#model-select option')).some(o => o.value === 'c')")
    # only the runs directory (and --adapters-dir) may be loaded from: the page shows the server's refusal
    page.evaluate("loadAdapter('x', %s)" % json.dumps(str(ui["top"] / "adapters" / "b")))
    page.wait_for_selector("#error-bar", state="visible")
    assert "outside the adapter directories" in page.inner_text("#error-text")
    page.click("#error-close")


# Train ---------------------------------------------------------------------------------------------
def fill_form(page, name, values):
    page.fill("#f-name", name)
    for key, value in values.items():
        page.fill(f"#f-{key.replace('.', '-')}", value)
    page.fill("#f-overrides", MORE)


def test_a_bad_value_is_shown_beside_its_field(page, ui, tmp_path):
    tab(page, "train")
    fill_form(page, "bad", {**RUN_SETTINGS, "training.lr": "-1"})
    page.click("#train-submit")
    error = page.locator('.field[data-key="training.lr"] .field-error')
    error.wait_for(state="visible")
    assert "training.lr must be > 0" in error.inner_text()
    fill_form(page, "bad", {**RUN_SETTINGS, "data.train": "../outside.jsonl"})
    page.click("#train-submit")
    page.wait_for_function("document.querySelector('.field[data-key=\"data.train\"] .field-error').textContent"
                           ".includes('traversal')")
    assert page.locator('.field[data-key="training.lr"] .field-error').inner_text() == ""  # cleared
    screenshot(page, "train_form_error", tmp_path, ['.field.invalid[data-key="data.train"]', "#train-submit"])
    assert not (ui["top"] / "runs" / "bad").exists()


def test_a_run_from_the_form_survives_closing_the_page(browser, page, ui, tmp_path):
    tab(page, "train")
    fill_form(page, "run1", RUN_SETTINGS)
    page.click("#train-submit")
    page.wait_for_url("**/ui/#runs/run1")
    state = httpx.get(ui["url"] + "/ui/api/run", params={"name": "run1"}).json()["job"]["state"]
    assert state in ("starting", "running")
    page.goto("about:blank")  # the page goes away mid-run
    time.sleep(1)
    other = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    other.goto(ui["url"] + "/ui/#runs/run1")
    other.wait_for_selector("#run-detail", state="visible")
    assert wait_state(other, ["finished"]) == "finished"
    other.close()
    page.goto(ui["url"] + "/ui/#runs/run1")
    page.wait_for_selector("#run-detail", state="visible")
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points) >= 3")
    assert int(page.locator("#chart-lr").get_attribute("data-points")) == 3
    assert int(page.locator("#chart-tps").get_attribute("data-points")) == 3
    assert page.locator("#checkpoint-list li[data-checkpoint]").count() == 3  # every checkpoint, not the last 2
    assert "[plugtune ui] finished" in page.inner_text("#run-log")
    screenshot(page, "run", tmp_path, ["#chart-loss", "#checkpoint-list li", "#run-adapters .adapter-load", "#run-config"])


def test_its_adapter_loads_into_the_playground(page, ui):
    page.goto(ui["url"] + "/ui/#runs/run1")
    page.locator("#run-adapters .adapter-load").first.click()
    page.wait_for_url("**/ui/#playground")
    page.wait_for_function("document.querySelector('#model-select').value === 'run1'")
    msg, text = chat(page, "run1", "say 5")
    assert msg.get_attribute("data-adapter") == "run1"
    assert text == reference_answer(ui, "run1", "say 5")


def test_a_checkpoint_loads_into_the_playground(page, ui):
    page.goto(ui["url"] + "/ui/#runs/run1")
    page.locator('#checkpoint-list li[data-checkpoint="step-0000002"] .ckpt-load').click()
    page.wait_for_url("**/ui/#playground", timeout=90_000)
    page.wait_for_function("document.querySelector('#model-select').value === 'run1-step-0000002'")
    from safetensors.torch import load_file

    ckpt = load_file(ui["top"] / "runs" / "run1" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    saved = load_file(ui["top"] / "runs" / "run1" / "checkpoint_adapters" / "step-0000002" / "adapter_model.safetensors")
    assert len(saved) == len(ckpt) and sorted(t.numel() for t in saved.values()) == sorted(t.numel() for t in ckpt.values())
    for t in ckpt.values():  # each checkpoint tensor is in the saved adapter, value for value
        assert any(s.shape == t.shape and torch.equal(s, t) for s in saved.values())


def test_the_page_run_gives_the_clis_adapter_bytes(ui, tmp_path):
    overrides = [f"model.name={ui['model']}", "method=lora", "objective=sft",
                 *(f"{k}={ui['top'] / 'data' / v if k == 'data.train' else v}" for k, v in RUN_SETTINGS.items()),
                 "training.keep_checkpoints=0", *MORE.split("\n"), f"output.dir={tmp_path / 'cli'}"]
    subprocess.run([sys.executable, "-m", "plugtune.cli", "train", "lora_sft", *overrides], cwd=tmp_path, env=child_env(),
                   check=True, capture_output=True, timeout=300)
    page_run = ui["top"] / "runs" / "run1" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cli" / "adapter" / name).read_bytes() == (page_run / name).read_bytes(), name


def test_continue_a_finished_run_then_stop_and_resume_another(page, ui):
    page.goto(ui["url"] + "/ui/#runs/run1")
    wait_state(page, ["finished"])
    page.fill("#continue-steps", "2")
    page.click("#run-continue")
    wait_state(page, ["starting", "running"], 30)
    assert wait_state(page, ["finished", "failed", "died"]) == "finished"
    page.wait_for_function("document.querySelector('#run-progress').textContent.startsWith('step 5 of 5')")
    assert page.locator("#checkpoint-list li[data-checkpoint]").count() == 5
    # a longer run: stop it while it trains, then resume it from its last checkpoint to the end
    tab(page, "train")
    fill_form(page, "run2", {**RUN_SETTINGS, "training.max_steps": "150", "training.lr": "0.001"})
    page.click("#train-submit")
    page.wait_for_url("**/ui/#runs/run2")
    deadline = time.time() + 90
    while len(httpx.get(ui["url"] + "/ui/api/run", params={"name": "run2"}).json()["checkpoints"]) < 2:
        assert time.time() < deadline, "run2 wrote no checkpoint in 90 s"
        time.sleep(0.3)
    page.click("#run-stop")
    assert wait_state(page, ["stopped", "finished", "failed", "died"], 60) == "stopped"
    stopped_at = httpx.get(ui["url"] + "/ui/api/run", params={"name": "run2"}).json()["checkpoints"][-1]["step"]
    assert 1 <= stopped_at < 150
    page.click("#run-resume")
    wait_state(page, ["starting", "running"], 30)
    assert wait_state(page, ["finished", "failed", "died"]) == "finished"
    run = httpx.get(ui["url"] + "/ui/api/run", params={"name": "run2"}).json()
    log = (ui["top"] / "runs" / "run2" / "ui" / "log.txt").read_text()
    assert f"resumed from {ui['top'] / 'runs' / 'run2' / 'checkpoints'}" in log and run["steps"] == 150
    steps = [r["step"] for r in run["metrics"] if r.get("kind") == "train"]
    assert steps == list(range(1, 151))  # no step lost or repeated across the stop


def test_overlay_two_runs(page, ui, tmp_path):
    tab(page, "runs")
    page.wait_for_selector('#runs-table tr[data-run="run1"]')
    for name in ("run1", "run2"):
        page.check(f'#runs-table tr[data-run="{name}"] .overlay-check')
    page.click("#overlay-btn")
    chart = page.locator("#overlay-chart")
    chart.wait_for(state="visible")
    assert chart.get_attribute("data-runs") == "2" and int(chart.get_attribute("data-points")) >= 6
    screenshot(page, "runs", tmp_path, ["#runs-table tbody tr", "#overlay-chart"])


def test_compare_report_and_export(page, ui, tmp_path):
    report = ui["top"] / "runs" / "cmp"
    report.mkdir()
    (report / "report.md").write_text("# Compare\n\n| technique | exact match | params |\n|---|---|---|\n"
                                      "| LoRA | 0.91 | 1,843,200 |\n| full | 0.93 | 134,515,008 |\n")
    (report / "report.json").write_text("{}")
    shutil.copy(ui["top"] / "runs" / "run1" / "loss_curve.png", report / "loss_curves.png")
    tab(page, "compare")
    page.select_option("#compare-select", "cmp")
    page.click("#compare-open")
    page.wait_for_selector("#compare-report table td")
    assert page.locator("#compare-report table tr").count() == 3
    page.wait_for_function("document.querySelector('#compare-report img').naturalWidth > 0")
    screenshot(page, "compare", tmp_path, ["#compare-report table", "#compare-report img"])
    tab(page, "export")
    adapter = str((ui["top"] / "runs" / "run1" / "adapter").resolve())
    page.select_option("#export-adapter", adapter)
    page.fill("#export-name", "merged1")
    page.click("#export-submit")
    page.wait_for_selector('#export-list li[data-export="merged1"][data-state="finished"]', timeout=90_000)
    assert (ui["top"] / "runs" / "exports" / "merged1" / "model" / "config.json").is_file()
    page.fill("#export-name", "merged1")
    page.click("#export-submit")  # the same name again: refused, and the page says so
    page.wait_for_selector("#error-bar", state="visible")
    assert "exists already" in page.inner_text("#error-text")
    screenshot(page, "export", tmp_path, ["#export-list li", "#export-adapter", "#error-bar"])
