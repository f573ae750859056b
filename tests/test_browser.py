"""The widget chapters used as a learner uses them: JupyterLab in headless Chromium, Run All, then every slider moved.

For each chapter with an `interactive` widget, on a temporary copy of the notebooks (the repository is not touched):
1. opened before any kernel ran, no output shows a widget's raw text (`interactive(children=(IntSlider(...`): a
   widget cell shows a static picture (or a note) until the kernel runs;
2. Run All (the Run menu) executes every cell without an error, with the chapter's small papermill-style parameters;
3. every control of the widget is moved in the browser (the first slider dragged with the mouse, the others with the
   keyboard, dropdowns picked; a SelectionSlider's options checked by value): the output redraws, the callback ran with the value the browser shows (read back from
   the kernel), and no traceback appears; sliders that re-measure (chapter 03) update only when let go, and say
   "measuring…" meanwhile;
4. each slider's track is wide enough that one pixel moves at most one step.

Needs Chromium (Debian's `chromium` package; or SNAKES_CHROMIUM=/path/to/chromium) and the `playwright` Python
package, which drives that Chromium (`playwright install` is not needed). Without them the tests skip and say why.
Run alone: `pytest -m browser tests/test_browser.py`.
"""
from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_S = 900          # one chapter's Run All, on a busy 2-core machine
REDRAW_TIMEOUT_S = 180           # one slider move of chapter 03 re-measures


@dataclass
class Chapter:
    widget: str                              # the notebook's variable holding the `interactive`
    params: dict = field(default_factory=dict)   # papermill-style overrides of the `parameters` cell
    measures: bool = False                   # the callback measures (seconds): sliders must wait for the release
    status: str | None = None                # text the status line shows after a redraw, {kwarg} filled in


CHAPTERS = {
    "01_hippo.ipynb": Chapter("hippo_widget"),
    "03b_ssd_cost.ipynb": Chapter("explorer", dict(SEQLENS=[256, 512], SWEEP_SEQLEN=512, REPEATS=1), measures=True,
                            status="chunk size {chunk_size}, dstate {dstate}:"),
    "07b_generate.ipynb": Chapter("sampler", dict(train_steps=10, train_minutes=0.25, max_new_tokens=10,
                                                 timing_lengths=[16, 64])),
    "08b_mamba_vs_transformer.ipynb": Chapter("state_widget", dict(
        lm_steps=2, lm_lrs=[1e-2], lm_batch_size=2, lm_seq_len=32, lm_eval_every=1, story_tokens=4,
        train_seq_lens=[128, 256], train_tokens_per_step=256, decode_context_lens=[16, 32], decode_new_tokens=2)),
    "08c_mqar.ipynb": Chapter("mqar_widget", dict(mqar_d_models=[16], mqar_d_states=[4], mqar_steps=2)),
}


# Found by this test and not fixed yet (issue 14); each is reported when it fails, and XPASS once fixed.
KNOWN = {
}


def _shows_interactive(cell: dict) -> bool:
    "A code cell that builds an `interactive` and displays a widget."
    return cell["cell_type"] == "code" and "interactive(" in "".join(cell["source"]) and any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.get("outputs", []))


def test_every_widget_chapter_is_listed():
    "A new chapter with an `interactive` widget must be added to CHAPTERS (or this test says which)."
    with_widgets = sorted(p.name for p in (REPO / "notebooks").glob("[0-9]*.ipynb")
                          if any(_shows_interactive(c) for c in json.loads(p.read_text())["cells"]))
    assert with_widgets == sorted(CHAPTERS), f"widget chapters {with_widgets}, tested {sorted(CHAPTERS)}"


# ---------------------------------------------------------------------------------------------------- set-up
def _chromium() -> str:
    exe = os.environ.get("SNAKES_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not Path(exe).exists():
        why = os.environ.get("SNAKES_NO_BROWSER_REASON") or (
            "install Debian's `chromium` package (apt-get install chromium) or set SNAKES_CHROMIUM to a Chromium binary")
        pytest.skip(f"browser test: no Chromium found ({why})")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_course(dest: Path) -> None:
    """The widget notebooks (with their parameters applied) in dest/notebooks, and the committed benchmark results
    that chapters plot, in dest/benchmarks/results: what the chapters find in a checkout."""
    import nbformat
    from papermill.iorw import load_notebook_node          # as papermill reads a notebook: every cell gets tags
    from papermill.parameterize import parameterize_notebook
    (dest / "notebooks").mkdir(parents=True)
    shutil.copytree(REPO / "benchmarks" / "results", dest / "benchmarks" / "results")
    for name, ch in CHAPTERS.items():
        nb = load_notebook_node(str(REPO / "notebooks" / name))
        if ch.params:
            assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{name} has no parameters cell"
            nb = parameterize_notebook(nb, ch.params, kernel_name="python3", language="python")
        nbformat.write(nb, dest / "notebooks" / name)


class Lab:
    "A JupyterLab server on 127.0.0.1 (a free port, a token) serving `root`, with its own settings and runtime dirs."

    def __init__(self, root: Path, state: Path):
        self.root, self.port, self.token = root, _free_port(), secrets.token_hex(16)
        self.runtime = state / "runtime"
        settings = state / "settings"
        notify = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notify.parent.mkdir(parents=True)
        notify.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))   # no news pop-up
        env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the kernel draws inline, as for a learner
        env.update(JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_DATA_DIR=str(state / "data"),
                   JUPYTER_RUNTIME_DIR=str(self.runtime), JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"), IPYTHONDIR=str(state / "ipython"))
        self.log = open(state / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}"], env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.api("status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("JupyterLab did not start:\n" + (state / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)

    def url(self, path: str) -> str:
        "A page of the server; `reset`: a fresh workspace, so that only this notebook is open."
        return f"http://127.0.0.1:{self.port}/{path}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def session(self, nb_path: str) -> dict:
        return next(s for s in self.api("sessions") if s["path"] == nb_path)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()           # the server shuts its kernels down on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def browser_page_factory():
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test: the `playwright` package is missing "
                                   "(pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield lambda: browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


@pytest.fixture(scope="module")
def lab(browser_page_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    _copy_course(root)
    server = Lab(root, tmp_path_factory.mktemp("jupyter"))
    yield server
    server.stop()


class Kernel:
    """A second client of the notebook's kernel: reads the widget's state in Python, without printing into the page.

    It asks only while no widget message is being handled: every execute request ends with the inline backend's
    `post_execute` hook, which draws and closes the open figures, so a request that lands while a callback (in
    JupyterLab's comm subshell, another thread) is drawing would take its figure away and race it."""

    def __init__(self, lab: Lab, nb_path: str):
        from jupyter_client import BlockingKernelClient
        kid = lab.session(nb_path)["kernel"]["id"]
        self.kc = BlockingKernelClient(connection_file=str(lab.runtime / f"kernel-{kid}.json"))
        self.kc.load_connection_file()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.busy, self.errors, self.last_busy = set(), [], time.monotonic()

    def _drain(self):
        while self.kc.iopub_channel.msg_ready():
            msg = self.kc.get_iopub_msg(timeout=1)
            parent = msg.get("parent_header") or {}
            if msg["msg_type"] == "status" and parent.get("msg_type", "").startswith("comm_"):
                state = msg["content"]["execution_state"]
                (self.busy.add if state == "busy" else self.busy.discard)(parent["msg_id"])
                self.last_busy = time.monotonic()
            elif msg["msg_type"] == "error":
                c = msg["content"]
                self.errors.append(f"{c['ename']}: {c['evalue']}\n" + "\n".join(c["traceback"][-3:]))

    def wait_quiet(self, quiet_s: float = 1.0, timeout: float = REDRAW_TIMEOUT_S):
        "Wait until no widget message has been handled for quiet_s seconds."
        _wait_for(lambda: (self._drain() or True) and not self.busy and time.monotonic() - self.last_busy > quiet_s,
                  "the widget's messages to be handled", timeout=timeout, every=0.05)

    def eval(self, expr: str, timeout: float = REDRAW_TIMEOUT_S):
        self.wait_quiet(timeout=timeout)
        reply = self.kc.execute("", silent=True, user_expressions={"v": expr}, reply=True, timeout=timeout)
        v = reply["content"]["user_expressions"]["v"]
        assert v["status"] == "ok", f"{expr}: {v.get('ename')}: {v.get('evalue')}"
        return ast.literal_eval(v["data"]["text/plain"])

    def tracebacks(self) -> list[str]:
        "Errors the kernel published since the last call, from any source: an `interactive` callback's exception goes "
        "to no cell, so the page never shows it."
        self._drain()
        errors, self.errors = self.errors, []
        return errors

    def close(self):
        self.kc.stop_channels()


def probe(widget: str) -> str:
    "A Python expression: what the widget's callback last ran with, its result's plain values, its controls."
    return (
        "(lambda W: {'kwargs': {k: v for k, v in W.kwargs.items() if isinstance(v, (bool, int, float, str))}, "
        "'result': {k: v for k, v in (W.result if isinstance(W.result, dict) else {}).items() "
        "if isinstance(v, (bool, int, float, str))}, "
        "'outputs': [o.get('output_type') for o in W.out.outputs], "
        "'controls': [(c._kwarg, c.description, getattr(c, 'continuous_update', None), getattr(c, 'step', None), "
        "list(c._options_labels) if type(c).__name__ == 'SelectionSlider' else None) "
        f"for c in W.kwargs_widgets if hasattr(c, 'description')]}})({widget})")


# ------------------------------------------------------------------------------------------- in the browser
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"          # the notebook on screen
JS_PROMPTS = f"() => [...document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
# A slider's value and range as the widget holds them. Not the handle's aria-valuenow/-min/-max: noUiSlider writes
# those with toFixed(1), so a FloatSlider of step 0.05 at 1.05 reads "1.1" there (seen as "handle 1.1, kernel 1.05").
JS_SLIDER_VALUE = "el => Number(el.noUiSlider.get())"
JS_SLIDER_RANGE = "el => [Number(el.noUiSlider.options.range.min), Number(el.noUiSlider.options.range.max)]"
JS_WATCH_STATUS = """el => { window.__status = []; new MutationObserver(() => window.__status.push(el.textContent))
                             .observe(el, {subtree: true, childList: true, characterData: true}); }"""


def _output_fingerprint(interact) -> str:
    "What the widget's output area shows: its pictures' data, else its text."
    out = interact.locator(".widget-output").first
    srcs = out.locator("img").evaluate_all("els => els.map(e => e.src)")
    return "\n".join(srcs) if srcs else out.text_content()


def _wait_for(cond, what: str, timeout: float = REDRAW_TIMEOUT_S, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return v


def _same(a, b) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else abs(float(a) - float(b)) < 1e-9


def _option(labels: list[str], index: float):
    "A SelectionSlider's value at track position `index` (its handle moves over the options' indices): the option's "
    "label, as a number where it is one (the kernel's value is the option itself)."
    label = labels[round(index)]
    try:
        return float(label)
    except ValueError:
        return label


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=False))
                                  if n in KNOWN else n for n in CHAPTERS])
def test_widget_chapter_in_the_browser(lab, browser_page_factory, name):
    ch, nb_path = CHAPTERS[name], f"notebooks/{name}"
    saved = json.loads((lab.root / nb_path).read_text())
    code_cells = [i for i, c in enumerate(saved["cells"]) if c["cell_type"] == "code"]
    widget_cells = [i for i in code_cells if _shows_interactive(saved["cells"][i])]
    timings = {}
    t0 = time.monotonic()
    page = browser_page_factory()
    page.set_default_timeout(60_000)
    try:
        # 1. Opened, before any kernel ran: the stored outputs as a learner first sees them.
        page.goto(lab.url(f"lab/tree/{nb_path}"))
        page.wait_for_function(f"document.querySelectorAll('{PANEL} .jp-Cell').length === {len(saved['cells'])}")
        page.wait_for_selector(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        cells = page.locator(f"{PANEL} .jp-Cell")
        for i in widget_cells:
            out = cells.nth(i).locator(".jp-OutputArea-output")
            _wait_for(lambda: out.count() > 0, f"cell {i}'s stored output to render", timeout=60)
            text = " ".join(out.all_text_contents())
            assert "children=(" not in text, f"{name} cell {i} shows the widget's raw text before Run All: {text[:120]}"
            assert cells.nth(i).locator(".jp-OutputArea-output img").count() > 0 or "run the notebook" in text, \
                f"{name} cell {i} shows neither a picture nor a note before Run All: {text[:120]!r}"
        raw = [t[:80] for t in page.locator(f"{PANEL} .jp-OutputArea-output").all_text_contents() if "(children=(" in t]
        assert not raw, f"{name}: outputs show a widget's raw text before Run All: {raw}"
        timings["open"] = time.monotonic() - t0

        # 2. Run All, from the Run menu.
        t1 = time.monotonic()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.wait_for_function(f"({JS_PROMPTS})().some(t => t.includes('*'))", timeout=30_000)
        page.wait_for_function(f"!({JS_PROMPTS})().some(t => t.includes('*'))", timeout=RUN_ALL_TIMEOUT_S * 1000,
                               polling=500)
        prompts = page.evaluate(JS_PROMPTS)
        not_run = [i for i, p in zip(code_cells, prompts) if not p.strip("[]:").isdigit()]
        timings["run_all"] = time.monotonic() - t1

        kernel = Kernel(lab, nb_path)
        try:
            _check_saved_without_errors(lab, page, nb_path, not_run)
            t2 = time.monotonic()
            _move_every_control(page, kernel, cells.nth(widget_cells[0]), ch, name)
            timings["widgets"] = time.monotonic() - t2
        finally:
            kernel.close()
    finally:
        page.close()
        try:
            lab.api(f"sessions/{lab.session(nb_path)['id']}", method="DELETE")     # stop the kernel: free the CPU
        except (StopIteration, OSError):
            pass
    print(f"{name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


def _check_saved_without_errors(lab: Lab, page, nb_path: str, not_run: list[int]):
    "Save (Ctrl+S) and read the file back: every code cell ran, and none has an error output."
    before = lab.api(f"contents/{nb_path}?content=0")["last_modified"]
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    _wait_for(lambda: lab.api(f"contents/{nb_path}?content=0")["last_modified"] != before
              and page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() == 0,
              "the notebook to be saved", timeout=60)
    nb = lab.api(f"contents/{nb_path}")["content"]
    errors = [(i, o["ename"], o["evalue"][:200]) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
              for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{nb_path}: cells with errors after Run All: {errors}"
    assert not not_run, f"{nb_path}: Run All left code cells {not_run} without an execution count"


def _move_every_control(page, kernel: Kernel, cell, ch: Chapter, name: str):
    interact = cell.locator(".widget-interact").first
    interact.scroll_into_view_if_needed()
    stale = cell.locator("img").evaluate_all("els => els.filter(e => !e.closest('.widget-output')).length")
    assert stale == 0, f"{name}: the widget cell shows {stale} picture(s) beside the live widget, which go stale"
    state = kernel.eval(probe(ch.widget))
    assert state["outputs"] and "error" not in state["outputs"], f"{name}: widget output after Run All: {state['outputs']}"
    controls = {desc: (kw, cu, step, labels) for kw, desc, cu, step, labels in state["controls"]}
    status = cell.locator(".widget-html").first if ch.status else None
    if status is not None:
        status.evaluate(JS_WATCH_STATUS)
    sliders = interact.locator(".widget-slider")
    assert sliders.count() >= 1, f"{name}: no slider in the widget"
    # Every slider by keyboard (one step), then the first one dragged. The first widget message after Run All goes
    # to the kernel's main shell, later ones to JupyterLab's comm subshell, and the two can be handled out of order,
    # leaving the kernel on a value next to the one shown (a JupyterLab 4.6 behaviour, seen as 0.35 vs 0.3 when the
    # drag came first); a single key press first keeps this test about the widgets.
    for j, drag in [(j, False) for j in range(sliders.count())] + [(0, True)]:
        s = sliders.nth(j)
        desc = s.locator(".widget-label").text_content()
        kw, cont, step, labels = controls[desc]
        step = 1 if labels else step          # a SelectionSlider's track runs over its options' indices
        handle, track = s.locator(".noUi-handle"), s.locator(".noUi-target")
        s.scroll_into_view_if_needed()
        lo, hi = track.evaluate(JS_SLIDER_RANGE)
        width = track.bounding_box()["width"]
        assert width >= (hi - lo) / step, (f"{name}: slider {desc!r} has {(hi - lo) / step:.0f} steps on a "
                                           f"{width:.0f}-pixel track: one pixel jumps several steps; widen it")
        if ch.measures:
            assert cont is False, f"{name}: slider {desc!r} re-measures while it is dragged: continuous_update=False"
        old_value, old_out = track.evaluate(JS_SLIDER_VALUE), _output_fingerprint(interact)
        if status is not None:
            page.evaluate("() => { window.__status = []; }")
        if drag:       # drag the handle a third of the track towards the far end, then let go
            box = handle.bounding_box()
            x0, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            dx = max(width / 3, 1.2 * width * step / (hi - lo)) * (1 if (old_value - lo) < (hi - lo) / 2 else -1)  # >= a step
            page.mouse.move(x0, y)
            page.mouse.down()
            for k in range(1, 11):
                page.mouse.move(x0 + dx * k / 10, y)
                time.sleep(0.05)
            time.sleep(1.0)
            if ch.measures:     # still held: nothing re-measured, the kernel still has the old value
                assert page.evaluate("() => window.__status") == [], f"{name}: {desc!r} re-measured during the drag"
                assert _same(kernel.eval(probe(ch.widget))["kwargs"][kw], old_value)
            page.mouse.up()
        else:          # the keyboard: one step
            handle.focus()
            page.keyboard.press("ArrowRight" if old_value < hi else "ArrowLeft")
        new_value = track.evaluate(JS_SLIDER_VALUE)
        assert new_value != old_value, f"{name}: slider {desc!r} did not move"
        _wait_for(lambda: _output_fingerprint(interact) != old_out, f"{name}: the output to redraw after {desc!r}")
        _check_callback_ran_with(kernel, ch, name, {kw: _option(labels, new_value) if labels else new_value}, status)
        readout = s.locator(".widget-readout").text_content()
        if labels:
            assert readout == labels[round(new_value)], f"{name}: {desc!r} reads {readout}, its handle is at option {new_value}"
        else:
            assert _same(float(readout), new_value), f"{name}: {desc!r} reads {readout}, its handle is at {new_value}"
        if status is not None:
            seen = page.evaluate("() => window.__status")
            assert any("measuring" in t for t in seen), f"{name}: no 'measuring…' while {desc!r} re-measured: {seen}"
    for d in range(interact.locator(".widget-dropdown select").count()):
        select = interact.locator(".widget-dropdown select").nth(d)
        desc = interact.locator(".widget-dropdown .widget-label").nth(d).text_content()
        options = select.locator("option").evaluate_all("els => els.map(e => e.value)")
        old, old_out = select.input_value(), _output_fingerprint(interact)
        new = next(o for o in reversed(options) if o != old)
        select.select_option(new)
        _wait_for(lambda: _output_fingerprint(interact) != old_out, f"{name}: the output to redraw after {desc!r}")
        _check_callback_ran_with(kernel, ch, name, {controls[desc][0]: new}, status)


def _check_callback_ran_with(kernel: Kernel, ch: Chapter, name: str, want: dict, status=None):
    "The kernel's callback last ran with the browser's value, its result says so where it names it, no traceback."
    def ran(st):       # kwargs are set when a run starts, result when it ends: a drag queues several runs
        return all(_same(st["kwargs"][k], v) and _same(st["result"].get(k, v), v) for k, v in want.items())

    last = {}

    def done():
        last["state"] = kernel.eval(probe(ch.widget))
        return ran(last["state"]) and last["state"]

    try:
        state = _wait_for(done, f"{name}: the callback to run with {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}; the kernel last had {last.get('state')}") from None
    finally:
        errors = kernel.tracebacks()
        assert not errors, f"{name}: the widget's callback raised after {want}:\n" + "\n".join(errors)
    assert "error" not in state["outputs"], f"{name}: the widget's output shows an error after {want}"
    if status is not None:
        text = ch.status.format(**state["kwargs"])
        _wait_for(lambda: text in status.text_content(), f"{name}: the status line to say {text!r}")
