"""index.html and the PNG plots: every cell in a self-contained page, seeds averaged, sorting that works in a
real (headless) browser with the dense row kept on top."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench import leaderboard
from bench.cli import main
from bench.records import Record, write_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--hide-scrollbars"]


def _rec(method: str, ratio: float, seed: int = 0, *, ppl: float | None = None, accs=(0.5, 0.7),
         model: str = "tiny", achieved: float | None = None, error: str | None = None,
         overrides: dict | None = None, tok_s: float = 30.0) -> Record:
    achieved = ratio if achieved is None else achieved
    params = round(100e6 * (1 - achieved))
    tasks = {"arc_easy": {"acc": accs[0] - 0.05, "acc_norm": accs[0], "main": "acc_norm"},
             "piqa": {"acc": accs[1], "main": "acc"}}
    metrics = {} if error else {"params": params, "weight_bytes": 4 * params, "perplexity": ppl, "tasks": tasks,
                                "mean_acc": sum(accs) / 2, "decode_tokens_per_s": tok_s, "prefill_ms": 100.0}
    budget = {"target_ratio": ratio, "achieved_ratio": achieved, "linear_ratio": 1.2 * achieved,
              "params_compressed": params, "tolerance": 0.02, "within_tolerance": abs(achieved - ratio) <= 0.02}
    return Record(model={"name": model}, method=method, knobs={}, knob_overrides=overrides or {},
                  target_ratio=ratio, seed=seed, suite={"name": "quick"}, status="failed" if error else "ok",
                  error=error, budget={} if error else budget, metrics=metrics)


RECORDS = [
    _rec("dense", 0.0, ppl=10.0, accs=(0.5, 0.7)),
    _rec("alpha", 0.2, 0, ppl=20.0, accs=(0.40, 0.60), tok_s=34.0),
    _rec("alpha", 0.2, 1, ppl=22.0, accs=(0.44, 0.64), tok_s=36.0),
    _rec("alpha", 0.4, ppl=50.0, accs=(0.35, 0.55), tok_s=40.0),
    _rec("alpha", 0.2, ppl=30.0, accs=(0.30, 0.50), overrides={"rank": 4}),
    _rec("beta", 0.2, ppl=15.0, accs=(0.45, 0.65)),
    _rec("beta", 0.4, ppl=80.0, accs=(0.30, 0.50), achieved=0.45),
    _rec("gamma", 0.2, error="RuntimeError: boom"),
    _rec("dense", 0.0, ppl=12.0, model="tiny-2"),
    _rec("alpha", 0.2, ppl=25.0, model="tiny-2"),
]


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """A results folder with two models, seeds, a knob variant, a budget miss, a failure and two bad files."""
    root = tmp_path_factory.mktemp("board")
    for r in RECORDS:
        write_record(root / "results", r)
    (root / "results" / "garbage.json").write_text("{not json")
    (root / "results" / "foreign.json").write_text(json.dumps({"hello": 1}))
    df, problems, paths = leaderboard.write(root / "results", root / "lb")
    assert len(problems) == 2
    assert {p.name for p in paths} >= {"index.html", "accuracy_vs_ratio.png", "perplexity_vs_ratio.png",
                                       "speed_vs_size.png"}
    return root / "lb"


class _Tables(HTMLParser):
    """Each ``table.board`` as keys (column names), sort (aria-sort per column) and bodies: lists of rows, a row a
    list of (data-v, text) per cell."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[dict] = []
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("class") == "board":
            self.tables.append({"keys": [], "sort": [], "bodies": []})
        elif not self.tables:
            return
        elif tag == "th":
            self.tables[-1]["keys"].append(a["data-key"])
            self.tables[-1]["sort"].append(a.get("aria-sort"))
        elif tag == "tbody":
            self.tables[-1]["bodies"].append([])
        elif tag == "tr" and self.tables[-1]["bodies"]:
            self.tables[-1]["bodies"][-1].append([])
        elif tag == "td":
            self._cell = [a.get("data-v"), ""]
            self.tables[-1]["bodies"][-1][-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data


def _table(html: str, model_has: str = "beta") -> dict:
    """The section's table whose rows mention ``model_has``, its cells as {key: (data-v, text)} per row."""
    for t in _Tables(html).tables:
        bodies = [[dict(zip(t["keys"], map(tuple, row), strict=True)) for row in body] for body in t["bodies"]]
        if any(row["method"][1] == model_has for body in bodies for row in body):
            return {"keys": t["keys"], "sort": dict(zip(t["keys"], t["sort"], strict=True)), "pinned": bodies[0],
                    "rows": bodies[1]}
    raise AssertionError(f"no table with {model_has}")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_cell_is_a_row_with_seeds_averaged_and_dense_first(board):
    html = (board / "index.html").read_text()
    t = _table(html)
    assert [r["method"][1] for r in t["pinned"]] == ["dense"]
    rows = {(r["method"][1], r["target"][1]): r for r in t["rows"]}
    assert set(rows) == {("alpha", "20.0%"), ("alpha", "40.0%"), ("alpha (rank=4)", "20.0%"), ("beta", "20.0%"),
                         ("beta", "40.0%"), ("gamma", "20.0%")}
    two_seeds = rows["alpha", "20.0%"]
    assert two_seeds["seeds"][1] == "0,1"
    assert two_seeds["ppl"] == ("21.0", "21.0020.00–22.00")  # the mean, then min-max
    assert float(two_seeds["mean_acc"][0]) == pytest.approx(0.52)
    assert "MISSED +5.0 pts" in rows["beta", "40.0%"]["budget"][1]
    assert rows["gamma", "20.0%"]["status"][1] == "failed: RuntimeError: boom"
    assert rows["gamma", "20.0%"]["ppl"] == ("", "-")
    assert [r["method"][1] for r in _table(html, "dense")["pinned"]] == ["dense"]  # the other model's section
    assert html.count("<section>") == 2 and "2 files skipped" in html and "garbage.json" in html


def test_accuracy_is_coloured_by_the_share_of_dense_accuracy_kept(board):
    html = (board / "index.html").read_text()
    # beta at 20%: mean 0.55 of dense 0.60 -> 91.7 % kept -> hue 120 * (0.917 - 0.6) / 0.4 = 95
    assert '<td data-v="0.55" style="background:hsl(95,70%,82%)">0.550</td>' in html
    assert 'data-v="1.0" style="background:hsl(120,70%,82%)">100.0%</td>' in html  # dense


def test_page_is_self_contained(board):
    html = (board / "index.html").read_text()
    assert html.count("<svg") == 12  # six figures per (model, suite)
    assert "http://" not in html and "https://" not in html and "@import" not in html
    assert not re.search(r"url\((?!#)", html)  # CSS url() only to the SVGs' own clip paths
    assert "<link" not in html and "<script src" not in html and "<img" not in html
    refs = [v for tag in html.split("<")[1:] for k, v in _attrs(tag) if k in ("src", "href", "xlink:href")]
    assert refs and all(v.startswith("#") for v in refs)  # only the SVGs' references to their own elements


def _attrs(tag: str):
    class One(HTMLParser):
        found: list = []

        def handle_starttag(self, _tag, attrs):
            self.found = attrs

    p = One()
    p.feed("<" + tag.split(">")[0] + ">")
    return p.found


def test_pngs_are_valid_images_with_content(board):
    from matplotlib.image import imread

    for name in ("accuracy_vs_ratio.png", "perplexity_vs_ratio.png", "kl_vs_ratio.png", "speed_vs_size.png"):
        width, height = _png_size(board / name)
        assert width > 2 * height > 600  # two (model, suite) panels side by side
        pixels = imread(board / name)
        assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def test_cli_leaderboard_writes_and_names_the_html(tmp_path, capsys):
    for r in RECORDS[:3]:
        write_record(tmp_path / "results", r)
    assert main(["leaderboard", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "lb")]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "index.html" in out and "speed_vs_size.png" in out
    assert "alpha" in (tmp_path / "lb" / "index.html").read_text()


def test_no_records_gives_a_page_and_no_plots(tmp_path):
    (tmp_path / "results").mkdir()
    _, _, paths = leaderboard.write(tmp_path / "results", tmp_path / "lb")
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.csv", "index.html"]
    assert "No records yet" in (tmp_path / "lb" / "index.html").read_text()


# --- a real browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = next(filter(None, map(shutil.which, BROWSERS)), None)
    if exe is None:
        pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH (apt-get install chromium)")
    return exe


def _ppl_order(values: list[str], descending: bool) -> bool:
    numbers = [float(v) for v in values if v != ""]
    return numbers == sorted(numbers, reverse=descending) and values[len(numbers):] == [""] * (len(values) - len(numbers))


def test_url_fragment_sorts_in_a_real_browser(board, chromium, tmp_path):
    """The page's own JS sorts on load from ``#sort=-ppl``; the DOM chromium dumps shows the result."""
    url = (board / "index.html").as_uri() + "#sort=-ppl"
    dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    t = _table(dom)
    assert t["sort"]["ppl"] == "descending"
    assert [r["method"][1] for r in t["pinned"]] == ["dense"]
    values = [r["ppl"][0] for r in t["rows"]]
    assert _ppl_order(values, descending=True) and values[0] == "80.0" and values[-1] == ""


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``: NUL-terminated JSON messages,
    chromium reading fd 3 and writing fd 4. Standard library only."""

    def __init__(self, exe: str, profile: Path, size=(1600, 1000)):
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()

        def onto_3_and_4():  # in the child, before exec: copy clear of 3 and 4 first, they may be our own ends
            a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=onto_3_and_4)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.session = b"", 0, None
        self.size = size

    def send(self, method: str, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": self.session} if self.session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def js(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.05)
        return value

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the middle of the first element matching ``selector``."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                       "e.scrollIntoView({block: 'center', inline: 'center'}); "
                       "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        self.session = None
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


STATE = """(() => {
  const t = [...document.querySelectorAll('table.board')].find(t => t.textContent.includes('beta'));
  const ths = [...t.tHead.rows[0].cells], col = k => ths.findIndex(th => th.dataset.key === k);
  const column = k => [...t.tBodies[1].rows].map(r => r.cells[col(k)].dataset.v);
  return {pinned: [...t.tBodies[0].rows].map(r => r.cells[0].textContent), ppl: column('ppl'),
          acc: column('mean_acc'), sorted: ths.map(th => th.getAttribute('aria-sort')), hash: location.hash};
})()"""


def _wait_sorted(browser: DevTools, key: str, order: str, fragment: str) -> None:
    """Until the click's hashchange has run the sort: the header shows ``order`` and the URL ``fragment``."""
    browser.wait_for(f"location.hash === '{fragment}' && [...document.querySelectorAll('th[data-key={key}]')]"
                     f".every(th => th.getAttribute('aria-sort') === '{order}')")


def test_header_clicks_sort_in_a_real_browser(board, chromium, tmp_path):
    """Real mouse clicks on the headers, through the DevTools protocol: ascending, then descending, then another
    column; the dense row never moves and failed cells (no value) stay last. Leaves a screenshot."""
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        browser.open((board / "index.html").as_uri())
        before = browser.js(STATE)
        assert before["pinned"] == ["dense"] and not any(before["sorted"])

        browser.click("th[data-key=ppl]")
        _wait_sorted(browser, "ppl", "ascending", "#sort=ppl")
        state = browser.js(STATE)
        assert state["pinned"] == ["dense"] and "ascending" in state["sorted"]
        assert _ppl_order(state["ppl"], descending=False) and state["ppl"][0] == "15.0"

        browser.click("th[data-key=ppl]")
        _wait_sorted(browser, "ppl", "descending", "#sort=-ppl")
        state = browser.js(STATE)
        assert state["pinned"] == ["dense"] and _ppl_order(state["ppl"], descending=True)

        browser.click("th[data-key=mean_acc]")
        _wait_sorted(browser, "mean_acc", "ascending", "#sort=mean_acc")
        acc = browser.js(STATE)["acc"]
        assert [float(v) for v in acc[:-1]] == sorted(float(v) for v in acc[:-1]) and acc[-1] == ""

        shot = tmp_path / "leaderboard.png"
        shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    assert _png_size(shot) == browser.size and shot.stat().st_size > 20_000


def test_the_section_counts_collapsed_cells_apart_from_failed_ones(tmp_path):
    """A collapsed cell ran (its record is ok) and is not a failure: the page's count says which is which."""
    for r in (_rec("dense", 0.0, ppl=10.0), _rec("alpha", 0.2, ppl=20.0), _rec("alpha", 0.2, 1, ppl=21.0),
              _rec("beta", 0.2, ppl=5000.0), _rec("gamma", 0.2, error="RuntimeError: boom")):
        write_record(tmp_path / "results", r)
    leaderboard.write(tmp_path / "results", tmp_path / "lb")
    text = (tmp_path / "lb" / "index.html").read_text()
    assert "3 ok cells, 1 collapsed (ran; perplexity over 100x dense), 1 failed." in text


def test_markdown_and_csv_name_a_knob_variant_as_a_row_of_its_own() -> None:
    from bench.leaderboard import frame, markdown

    df = frame(RECORDS)
    assert sorted(df[(df["model"] == "tiny") & (df["target"] == 0.2)]["method"].unique()) == \
        ["alpha", "alpha (rank=4)", "beta", "gamma"]
    assert "alpha (rank=4)" in markdown(df) and "(rank=4) (rank=4)" not in markdown(df)


def test_only_tasks_are_task_columns_whatever_else_a_record_holds(tmp_path):
    """Memory peaks, the device, the dtype and the offload flag are CSV columns, never tasks: once they were taken
    for tasks, coloured by the share of the dense model's "accuracy" and drawn as bars of the per-task chart."""
    from bench import plots
    from bench.leaderboard import COLUMNS, CSV_ONLY, frame
    from bench.report import _columns, cells

    full = [_rec("dense", 0.0, ppl=10.0), _rec("alpha", 0.2, ppl=20.0)]
    for r in full:
        r.cost = {"compress_peak_device_bytes": 3 * 2**20, "compress_peak_host_bytes": 5 * 2**20}
        r.metrics |= {"eval_peak_device_bytes": 2**20, "eval_peak_host_bytes": 2**21}
        r.details = {"placement": {"offload": True}}
        r.environment = {"hardware": {"device_name": "cpu"}}
        r.model["dtype"] = "float32"
    df = frame(full)
    assert set(df.columns) - set(COLUMNS) - set(CSV_ONLY) == set()  # every column is placed
    assert plots.task_columns(cells(df)) == ["ARC-e", "PIQA"]
    assert not set(_columns(cells(df))) & {"compress_peak_device_MB", "eval_peak_host_MB", "offloaded", "dtype"}
    for r in full:
        write_record(tmp_path / "results", r)
    leaderboard.write(tmp_path / "results", tmp_path / "lb")
    keys = _table((tmp_path / "lb" / "index.html").read_text(), model_has="alpha")["keys"]
    assert "offloaded" not in keys and "compress_peak_device_MB" not in keys and "PIQA" in keys


def test_a_doubtful_latency_is_not_compared_and_the_csv_says_why():
    import pandas as pd

    from bench.leaderboard import frame

    ok, noisy = _rec("alpha", 0.2, ppl=20.0), _rec("beta", 0.2, ppl=15.0, tok_s=0.47)
    ok.metrics["latency_detail"] = {"prefill_s": [0.10, 0.11], "decode_s": [1.0, 1.02]}
    noisy.metrics["latency_detail"] = {"prefill_s": [5.93, 3.80, 10.43], "decode_s": [73.7, 67.7, 53.8]}
    df = frame([_rec("dense", 0.0, ppl=10.0), ok, noisy]).set_index("method")
    assert df.loc["alpha", "decode_tok_s"] == 30.0 and pd.isna(df.loc["alpha", "latency_note"])
    assert df.loc["beta", ["prefill_ms", "decode_tok_s"]].isna().all()
    assert df.loc["beta", "latency_note"] == ("not compared: prefill repeats 2.7x apart (measured 100 ms prefill, "
                                              "0.47 tokens/s)")


def test_a_record_from_other_hardware_keeps_its_quality_but_not_its_speed_memory_or_compress_time():
    """A GPU run beside CPU records (the H200's DeltaLLM at 10M tokens in the quick section): its perplexity
    stands, its latency, evaluation peak and compress seconds are not put beside the CPU's, and the CSV says why;
    an unnamed device of the same type (older records) is not taken for other hardware."""
    import pandas as pd

    from bench.leaderboard import frame

    dense, cpu, gpu, old = (_rec("dense", 0.0, ppl=10.0), _rec("alpha", 0.2, ppl=20.0), _rec("beta", 0.2, ppl=15.0),
                            _rec("gamma", 0.2, ppl=25.0))
    for r, hw in ((dense, {"device": "cpu", "device_name": "AMD EPYC"}), (cpu, {"device": "cpu", "device_name": "AMD EPYC"}),
                  (gpu, {"device": "cuda", "device_name": "NVIDIA H200"}), (old, {"device": "cpu"})):
        r.environment = {"hardware": hw}
        r.metrics["peak_memory_bytes"] = 2**30
        r.cost = {"compress_seconds": 5.0}
    df = frame([dense, cpu, gpu, old]).set_index("method")
    assert df.loc["beta", "ppl"] == 15.0 and df.loc["beta", "device_name"] == "NVIDIA H200"
    assert df.loc["beta", ["prefill_ms", "decode_tok_s", "peak_mem_MB", "compress_s"]].isna().all()
    assert df.loc["beta", "latency_note"] == ("not compared: measured on NVIDIA H200, the dense record on AMD EPYC "
                                              "(measured 100 ms prefill, 30.00 tokens/s)")
    for same in ("alpha", "gamma"):
        assert df.loc[same, "prefill_ms"] == 100.0 and df.loc[same, "compress_s"] == 5.0
        assert df.loc[same, "peak_mem_MB"] == 1024 and pd.isna(df.loc[same, "latency_note"])


def test_scaling_figures_beside_the_records_are_passed_over_quietly(tmp_path):
    """results/scaling/ holds `bench scaling --json` files: slimbench's own, another schema, not a problem to report;
    a foreign JSON file still is."""
    from bench.records import load_records
    from bench.scaling import SCHEMA, SCHEMA_VERSION

    write_record(tmp_path, _rec("dense", 0.0, ppl=10.0))
    (tmp_path / "scaling").mkdir()
    (tmp_path / "scaling" / "7b.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION}))
    (tmp_path / "foreign.json").write_text(json.dumps({"schema": "someone.else"}))
    records, problems = load_records(tmp_path)
    assert len(records) == 1 and len(problems) == 1 and "foreign.json" in problems[0]


def test_a_long_legend_goes_under_the_axes_and_leaves_them_their_height():
    """Twenty knob-labelled methods: the legend beside the axes used to squeeze them to nothing."""
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from bench import plots

    rows = [{"method": "dense", "status": "ok", "achieved": 0.0, "mean_acc": 0.5, "budget": "-"}]
    rows += [{"method": f"delta (autocast=bf16, corpus=mix-en, lr={i}e-4, lr_schedule=cosine, train_tokens=262144)",
              "status": "ok", "achieved": 0.12, "mean_acc": 0.4 + i / 100, "budget": "ok"} for i in range(20)]
    cells = pd.DataFrame(rows)
    for col in ("achieved", "mean_acc"):
        cells[f"{col}_min"] = cells[f"{col}_max"] = cells[col]
    fig = plots.figure(plots.draw_accuracy, [("t", cells)])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # applies the constrained layout
    (ax,) = fig.axes
    assert ax.get_position().height * fig.get_figheight() > 2.5  # inches of plot, of the 4.2 a short legend leaves
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y1 < ax.get_window_extent(renderer).y0 and legend.y0 >= 0  # under the axes, inside the figure
    # 20 methods in 10 colours: the second round of colours gets the second marker
    assert {c.lines[0].get_marker() for c in ax.containers if c.get_label().startswith("delta")} == {"o", "s"}


def _docs(arc_right: int, piqa_right: int, n: int = 40) -> dict:
    """Per-document outcomes of ``n`` ARC-e documents (4 choices, 5 for every tenth) and ``n`` PIQA ones (2)."""
    return {"arc_easy": {"doc_id": list(range(n)), "correct": [int(i < arc_right) for i in range(n)],
                         "ll": [[0.0] * (5 if i % 10 == 0 else 4) for i in range(n)]},
            "piqa": {"doc_id": list(range(n)), "correct": [int(i < piqa_right) for i in range(n)],
                     "ll": [[0.0, 0.0] for _ in range(n)]}}


def test_chance_is_a_reference_row_under_dense_never_ranked_and_every_cell_is_tested_against_it(tmp_path):
    """What a uniform guess expects on the same documents, so that a reader sees the floor the accuracies sit on:
    a cell that guesses is marked "≈" in Δchance, one far above is not, and the chance row is never "best"."""
    from bench import plots
    from bench.evaluate import docs as docs_io
    from bench.leaderboard import CHANCE, REFERENCE, frame, markdown
    from bench.report import cells

    records = [_rec("dense", 0.0, ppl=10.0, accs=(36 / 40, 36 / 40)), _rec("alpha", 0.2, ppl=20.0, accs=(0.8, 0.8)),
               _rec("beta", 0.2, ppl=90.0, accs=(10 / 40, 20 / 40))]
    docs = [_docs(36, 36), _docs(32, 32), _docs(10, 20)]
    df = frame(records, docs)
    assert list(df["method"]) == ["dense", CHANCE, "alpha", "beta"]
    for draw in (plots.draw_accuracy, plots.draw_tasks):  # a dotted line at the guess's accuracy, in the legend
        (ax,) = plots.figure(draw, [("t", cells(df))]).axes
        assert "chance (uniform guess)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert CHANCE not in [t.get_text() for t in ax.get_legend().get_texts()]  # not drawn as a method
    row = df.set_index("method").loc[CHANCE]
    arc = (36 * 0.25 + 4 * 0.2) / 40
    assert (row["ARC-e"], row["PIQA"]) == pytest.approx((arc, 0.5))
    assert row["mean_acc"] == pytest.approx((arc + 0.5) / 2)
    assert row["retained"] == pytest.approx((arc + 0.5) / 2 / 0.9)
    assert row["status"] == REFERENCE and row["near_best"] is None and row["vs_chance"] is None
    marks = df.set_index("method")["vs_chance"]
    assert marks["beta"].startswith("≈ ")  # 10/40 and 20/40: a guess
    assert not marks["alpha"].startswith("≈") and not marks["dense"].startswith("≈")
    assert float(marks["alpha"].split("±")[0]) == pytest.approx(0.8 - (arc + 0.5) / 2, abs=6e-4)  # 3 digits
    assert df.set_index("method").loc["alpha", "near_best"] == "best"
    assert "| chance " in markdown(df) and "Δchance (paired)" in markdown(df)
    assert "chance" not in list(frame(records)["method"])  # no side files, no chance row
    for r, d in zip(records, docs, strict=True):
        r.metrics["zero_shot_docs"] = {"tasks": d}
        docs_io.write_beside(tmp_path / "results", r)
        write_record(tmp_path / "results", r)
    leaderboard.write(tmp_path / "results", tmp_path / "lb")
    t = _table((tmp_path / "lb" / "index.html").read_text(), model_has="beta")
    assert [r["method"][1] for r in t["pinned"]] == ["dense", CHANCE]
    html = (tmp_path / "lb" / "index.html").read_text()
    assert t["pinned"][1]["status"][1] == REFERENCE and '<tr class=""><td data-v="chance"' in html  # not a failure
    assert 'class="err text">reference' not in html


def test_a_method_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """The quick and standard panels side by side once gave JointDrop orange in one and green in the other: colours
    went by the order of the methods within each panel."""
    import pandas as pd

    from bench import plots, report

    def panel(methods):
        rows = [{"method": "dense", "status": "ok", "achieved": 0.0, "mean_acc": 0.5, "budget": "-"}]
        rows += [{"method": m, "status": "ok", "achieved": 0.1 * (i + 1), "mean_acc": 0.4, "budget": "ok"}
                 for i, m in enumerate(methods)]
        cells = pd.DataFrame(rows)
        for col in ("achieved", "mean_acc"):
            cells[f"{col}_min"] = cells[f"{col}_max"] = cells[col]
        return cells

    fig = plots.figure(plots.draw_accuracy, [("a", panel(["x", "y"])), ("b", panel(["z", "y"]))])
    seen = [{c.get_label(): c.lines[0].get_color() for c in ax.containers} for ax in fig.axes]
    assert seen[0]["y"] == seen[1]["y"] and len({seen[0]["x"], seen[0]["y"], seen[1]["z"]}) == 3

    # the HTML report draws one section at a time: it pins the same places on every section's cells
    pinned = []
    real = plots.figure
    monkeypatch.setattr(plots, "figure", lambda draw, groups, *a: pinned.append(groups[0][1].attrs["colours"])
                        or real(draw, groups, *a))
    records = [_rec("dense", 0.0, ppl=10.0), _rec("alpha", 0.2, ppl=20.0), _rec("beta", 0.2, ppl=30.0),
               _rec("dense", 0.0, ppl=10.0, model="tiny-2"), _rec("beta", 0.2, ppl=30.0, model="tiny-2")]
    report.write(records, tmp_path / "lb")
    assert pinned and all(p == pinned[0] for p in pinned) and set(pinned[0]) == {"alpha", "beta"}


def test_three_seeds_with_equal_values_draw_although_their_mean_rounds_past_them(tmp_path):
    """The mean of three equal floats can land one ulp outside them (0.1 three times averages to
    0.10000000000000002): the min/max error bars must not come out negative, which matplotlib refuses, failing
    the whole page after a run (it did, on three seeds of the same parameter count)."""
    recs = [_rec("dense", 0.0, ppl=10.0)] + [_rec("alpha", 0.2, s, ppl=20.0, accs=(0.1, 0.1)) for s in range(3)]
    for r in recs:
        write_record(tmp_path / "results", r)
    _, problems, paths = leaderboard.write(tmp_path / "results", tmp_path / "lb")
    assert problems == [] and (tmp_path / "lb" / "index.html").exists()
    assert {"accuracy_vs_ratio.png", "speed_vs_size.png"} <= {p.name for p in paths}  # index.html holds the task bars
    from bench.report import cells

    alpha = cells(leaderboard.frame(recs))
    alpha = alpha[alpha["method"] == "alpha"].iloc[0]
    assert sum([0.1] * 3) / 3 != 0.1 and alpha["mean_acc"] == alpha["mean_acc_min"] == alpha["mean_acc_max"] == 0.1
