"""The documentation site: its code runs, it builds strictly, it renders in a browser.

- Every ```python block of every page under docs/ runs. The blocks of one page
  run in order in one namespace, as a reader follows a tutorial; a block that
  sets KERAS_BACKEND runs alone in a fresh process without TensorFlow.
- The API reference has a mkdocstrings entry for every public name.
- docs/measurements.md is what docs/gen_measurements.py makes of
  benchmarks/results/*.json.
- `mkdocs build --strict` succeeds, and headless Chromium shows the home page,
  an API page and a tutorial with their content and no broken internal link.
"""

from __future__ import annotations

import functools
import glob
import html.parser
import http.server
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest
from _markdown_blocks import (
    ROOT,
    python_blocks,
    run_here,
    run_in_a_fresh_process_without_tensorflow,
    sets_backend,
)

import keras_goodinit

DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.relpath(path, DOCS)
               for path in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
PAGES_WITH_CODE = [page for page in PAGES if python_blocks(os.path.join(DOCS, page))]


def test_the_tutorials_have_code():
    tutorials = [page for page in PAGES if page.startswith("tutorials" + os.sep)]
    assert len(tutorials) >= 4, tutorials
    assert set(tutorials) - set(PAGES_WITH_CODE) <= {
        # Written by other helpers; each may or may not carry code.
        os.path.join("tutorials", "migrating-from-tfa.md"),
        os.path.join("tutorials", "signal-monitor.md")}, PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_code_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    namespace = {"__name__": "__docs__"}
    for line, source in python_blocks(os.path.join(DOCS, page)):
        label = f"docs/{page}:{line}"
        if sets_backend(source):
            run_in_a_fresh_process_without_tensorflow(label, source, tmp_path)
        else:
            run_here(label, source, namespace)


# ---------------------------------------------------------------- the API reference

_DIRECTIVE = re.compile(r"^::: (\S+)\n((?:[ ]{4}.*\n|\n)*)", re.M)


def _api_directives() -> dict[str, str]:
    """`::: identifier` -> its options block, over every page of docs/api/."""
    found = {}
    for path in glob.glob(os.path.join(DOCS, "api", "*.md")):
        with open(path, encoding="utf-8") as handle:
            text = handle.read() + "\n"
        for match in _DIRECTIVE.finditer(text):
            found[match.group(1)] = match.group(2)
    return found


def _public_members(module) -> set[str]:
    """Functions and classes a public module defines itself (not those it imports)."""
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and callable(value)
            and getattr(value, "__module__", None) == module.__name__}


def test_the_api_reference_documents_every_public_name():
    directives = _api_directives()
    missing = [name for name in keras_goodinit.__all__
               if f"keras_goodinit.{name}" not in directives]
    assert not missing, f"no `::: keras_goodinit.NAME` in docs/api/ for {missing}"
    for module_name in ("models", "propagation", "schedules"):
        module = importlib.import_module(f"keras_goodinit.{module_name}")
        options = directives.get(f"keras_goodinit.{module_name}")
        assert options is not None, f"no `::: keras_goodinit.{module_name}` in docs/api/"
        listed = re.search(r"members: \[(.*)\]", options)
        listed = set(re.findall(r"\w+", listed.group(1))) if listed else set()
        assert _public_members(module) <= listed, (module_name, _public_members(module) - listed)


# ---------------------------------------------------------------- the measurements page

def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_measurements", os.path.join(DOCS, "gen_measurements.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measurements_page_is_what_the_json_gives():
    generator = _generator()
    results = generator.load_results()
    assert results, "no benchmarks/results/*.json"
    with open(os.path.join(DOCS, "measurements.md"), encoding="utf-8") as handle:
        page = handle.read()
    assert page == generator.render(results), (
        "docs/measurements.md differs from benchmarks/results/*.json: "
        "run `python docs/gen_measurements.py`")


def test_every_figure_of_the_json_is_on_the_measurements_page():
    # Independent of render(): each timing ratio the JSON implies, as the page rounds it.
    generator = _generator()
    with open(os.path.join(DOCS, "measurements.md"), encoding="utf-8") as handle:
        page = handle.read()
    for result in generator.load_results():
        for row in result["rows"]:
            for key in ("lsuv_s", "lsuv_warm_s"):
                if key in row:
                    ratio = f"{row[key] / row['forward_s']:.1f}"
                    assert ratio in page, (result["benchmark"], row["depth"], key, ratio)
        load = result["machine"]["load_before"]
        assert f"{load[0]:.1f}" in page, (result["file"], load)


def test_the_measurements_page_fails_when_a_figure_changes(tmp_path):
    # The check above can fail: change one timing in a copy of a result, and the page differs.
    generator = _generator()
    results = generator.load_results()
    row = next(r for r in results if r["benchmark"] == "lsuv_speed")["rows"][0]
    row["lsuv_s"] = row["lsuv_s"] * 1.5 + 1.0
    with open(os.path.join(DOCS, "measurements.md"), encoding="utf-8") as handle:
        assert handle.read() != generator.render(results)


# ---------------------------------------------------------------- the built site

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built by `mkdocs build --strict` (a warning fails the build)."""
    folder = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return folder


def test_mkdocs_build_strict(site):
    for page in ("index.html", "getting-started.html", "concepts.html", "measurements.html",
                 os.path.join("api", "initializers.html"),
                 os.path.join("tutorials", "deep-mlp.html")):
        assert os.path.isfile(os.path.join(site, page)), page
    with open(os.path.join(site, "api", "initializers.html"), encoding="utf-8") as handle:
        api = handle.read()
    # mkdocstrings rendered the docstring, and the doctests as a highlighted console session
    # (the prompt a "gp" token of Pygments' pycon lexer), not as prose.
    assert "fan-in vector" in api and "GoodInit" in api, api[:2000]
    assert '<span class="gp">&gt;&gt;&gt; </span>' in api, api[:2000]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key) and (tag != "link" or key == "href"):
                self.hrefs.append(attrs[key])


def _parse(text: str) -> _Links:
    parser = _Links()
    parser.feed(text)
    return parser


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# Each page, and text of its own that must be in the rendered DOM.
_RENDERED = {
    "index.html": ["Deep Keras networks that train from step one", "Getting started"],
    "api/initializers.html": ["GoodInit", "fan-in vector", "wn_residual"],
    "tutorials/deep-mlp.html": ["Train a 100-layer MLP", "orthogonal_proposed"],
}


def test_the_site_renders_in_chromium(site, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    try:
        for page, texts in _RENDERED.items():
            url = base + page
            process = subprocess.run(flags + ["--dump-dom", url], capture_output=True,
                                     text=True, timeout=180)
            dom = process.stdout
            assert process.returncode == 0 and "</html>" in dom, (page, process.stderr[-2000:])
            for text in texts:
                assert text in dom, (page, text)
            _check_internal_links(site, base, url, dom)
        screenshots = os.path.join(ROOT, "runs", "docs")
        os.makedirs(screenshots, exist_ok=True)
        shot = os.path.join(screenshots, "home.png")
        process = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,1600",
                                          base + "index.html"],
                                 capture_output=True, text=True, timeout=180)
        assert process.returncode == 0, process.stderr[-2000:]
        with open(shot, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", shot
        assert os.path.getsize(shot) > 20_000, os.path.getsize(shot)  # not a blank page
        print(f"screenshot of the home page: {shot}")
    finally:
        server.shutdown()
        server.server_close()


def _check_internal_links(site, base: str, url: str, dom: str) -> None:
    """Every link of the page to the site resolves to a built file (and anchor)."""
    broken, checked = [], 0
    for href in _parse(dom).hrefs:
        target = urllib.parse.urljoin(url, href)
        if not target.startswith(base):
            continue  # outside the site (a paper, keras.io)
        checked += 1
        parts = urllib.parse.urlsplit(target)
        path = urllib.parse.unquote(parts.path[len(urllib.parse.urlsplit(base).path):])
        file = os.path.join(site, path or "index.html")
        if os.path.isdir(file):
            file = os.path.join(file, "index.html")
        if not os.path.isfile(file):
            broken.append(href)
            continue
        if parts.fragment and file.endswith(".html"):
            with open(file, encoding="utf-8") as handle:
                if parts.fragment not in _parse(handle.read()).ids:
                    broken.append(href)
    assert checked > 10, (url, checked)  # the navigation alone has more
    assert not broken, (url, broken)
