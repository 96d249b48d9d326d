"""The answer as the user sees it: in Chromium (Playwright) against the same answer through /v1.

    .venv/bin/python benchmarks/bench_browser.py [--questions 2] [--repeats 2] [--stream-seconds 0.5,0]

For each value of `--stream-seconds` (how often the page gets the answer while it is written;
0: every token, the app before issue 19), starts `python app.py` as a user does (default models,
torch's threads, a fixed token) on the sample corpus, and for each question, interleaved and
repeated: the answer through `/v1/chat/completions` (streamed, from the request to its last
chunk) and in Chromium (a new chat, from the Send click to the page showing "Answered in" with the
last word, both times taken inside the page). Greedy decoding with the chat's defaults, so the two
answers are the same text (checked: the page shows the cited answer /v1 returns in its extension).
Prints per question the medians, and browser / API as the median of the pairs (each pair back to
back, their order alternating), then over all pairs; also the page's re-renders of the chat and
the CPU seconds the server and Chromium spent per answer (on a shared machine the wall-clock
ratio is noisy; the CPU seconds are what the page costs).
Bar (issue 19): the browser within 1.15x of /v1.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sift_chat import config  # noqa: E402
from tests.served import served_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "bench-browser-token"
QUESTIONS = [
    "Who founded Brindlemoor and who keeps the lighthouse?",
    "When is the lantern festival and what is eaten there?",
    "What are the bottles of the glassworks coloured with?",
    "How many people live in Brindlemoor, and when does the ferry leave?",
]
# set when the status line first says the answer is complete after a Send (textContent: no layout)
# and how many times the chat's text changed meanwhile (the page's re-renders of the answer)
WATCH = """() => {
  window.__sent = null; window.__answered = null; window.__updates = 0; window.__chat = null;
  if (window.__observer) return;
  window.__observer = new MutationObserver(() => {
    if (window.__sent === null || window.__answered !== null) return;
    const chat = document.querySelector('#chatbot');
    const text = chat ? chat.textContent : '';
    if (text !== window.__chat) { window.__chat = text; window.__updates += 1; }
    const status = document.querySelector('#status');
    if (status && status.textContent.includes('Answered in')) window.__answered = performance.now();
  });
  window.__observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
SEND = "() => { window.__answered = null; window.__sent = performance.now(); document.querySelector('#send').click(); }"


def through_api(url: str, question: str) -> tuple[float, str, int]:
    """(seconds from the request to the last chunk, the cited answer, its text chunks)."""
    import json

    body = {"model": "sift-chat", "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0}
    cited, chunks = None, 0
    started = time.perf_counter()
    with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                if chunk.get("sift"):
                    cited = chunk["sift"]["cited_answer"]
                chunks += bool(chunk.get("choices") and chunk["choices"][0]["delta"].get("content"))
            elif line == "data: [DONE]":
                break
    return time.perf_counter() - started, cited or "", chunks


def in_browser(page, question: str) -> tuple[float, str, int]:
    """(seconds from the Send click to the complete answer on the page, the answer shown, how many
    times the chat's text changed on the page meanwhile)."""
    page.locator("#new-chat").click()
    page.wait_for_function("() => !document.querySelector('#status').textContent.includes('Answered')")
    page.locator("#message textarea").fill(question)
    page.evaluate(WATCH)
    page.evaluate(SEND)
    page.wait_for_function("() => window.__answered !== null", timeout=600_000, polling=200)
    seconds, updates = page.evaluate("() => [(window.__answered - window.__sent) / 1000, window.__updates]")
    return seconds, page.locator("#chatbot [data-testid='bot']").last.inner_text(), updates


def processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command name) of every process (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            found[int(entry.name)] = (int(rest[1]), name)
    return found


def cpu_seconds(match: str) -> float:
    """CPU seconds (user + system) used so far by this process's descendants whose command name
    contains `match` ("chrom": the browser; "python": the server app.py)."""
    table, total = processes(), 0.0
    mine = {os.getpid()}
    changed = True  # descendants: to a fixed point (a child's pid may be lower than its parent's)
    while changed:
        changed = False
        for pid, (parent, _) in table.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                changed = True
    for pid in mine - {os.getpid()}:
        if match in table[pid][1]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def same(a: str, b: str) -> bool:
    def words(text: str) -> list[str]:
        return re.findall(r"\w+|\[\d+\]", text)

    return words(a) == words(b)


def run(stream_seconds: float, questions: list[str], repeats: int, folder: Path) -> dict:
    from playwright.sync_api import sync_playwright

    data = folder / f"data-{stream_seconds:g}"
    data.mkdir()
    models = config.data_dir() / "models"  # the chat model converted once, as bench_message.py keeps it
    models.mkdir(parents=True, exist_ok=True)
    (data / "models").symlink_to(models)
    env = {"SIFT_CHAT_TOKEN": TOKEN, "SIFT_CHAT_STREAM_SECONDS": str(stream_seconds),
           "OMP_NUM_THREADS": str(os.cpu_count())}  # torch's own default, as a user runs it
    results = {q: {"api": [], "browser": [], "same": [], "chunks": [], "updates": [], "api_server_cpu": [],
                   "browser_server_cpu": [], "browser_cpu": [], "ratio": []} for q in questions}
    with served_app(data, env=env, ready_headers={"Authorization": f"Bearer {TOKEN}"}) as served, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(folder / f"profile-{stream_seconds:g}"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.set_default_timeout(300_000)
            page.goto(f"{served.url}?token={TOKEN}")
            page.get_by_role("tab", name="Corpus").click()
            page.get_by_role("button", name="Add the sample corpus").click()
            page.locator("#corpus-summary").filter(has_text="10 documents").wait_for()
            page.get_by_role("tab", name="Chat").click()
            through_api(served.url, questions[0])  # warm-up, both ways
            in_browser(page, questions[0])
            for repeat in range(repeats):
                for question in questions:  # interleaved: both see the same machine load
                    measured = {}

                    def via_api():
                        server = cpu_seconds("python")
                        measured["api"], measured["api_answer"], measured["chunks"] = through_api(served.url, question)
                        measured["api_server_cpu"] = cpu_seconds("python") - server

                    def via_page():
                        server, chromium = cpu_seconds("python"), cpu_seconds("chrom")
                        measured["browser"], measured["page_answer"], measured["updates"] = in_browser(page, question)
                        measured["browser_server_cpu"] = cpu_seconds("python") - server
                        measured["browser_cpu"] = cpu_seconds("chrom") - chromium

                    for one in ((via_api, via_page) if repeat % 2 == 0 else (via_page, via_api)):  # order alternates: drift cancels
                        one()
                    measured["same"] = same(measured.pop("api_answer"), measured.pop("page_answer"))
                    measured["ratio"] = measured["browser"] / measured["api"]  # a pair: back to back, one load
                    for name, value in measured.items():
                        results[question][name].append(value)
                    api_seconds, page_seconds = measured["api"], measured["browser"]
                    print(f"  stream every {stream_seconds:g} s, repeat {repeat + 1}: /v1 {api_seconds:.2f} s, "
                          f"browser {page_seconds:.2f} s, same answer {results[question]['same'][-1]}: "
                          f"{question}", file=sys.stderr, flush=True)
        finally:
            browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stream-seconds", default="0.5",
                        help="comma-separated update intervals of the page, one server each (0: every token)")
    args = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"bench_browser needs {CHROMIUM} (apt-get install chromium)")
    questions = QUESTIONS[: args.questions]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        runs = {s: run(s, questions, args.repeats, Path(folder))
                for s in (float(x) for x in args.stream_seconds.split(",") if x.strip())}
    print(f"default models and chat settings, greedy; {args.repeats} repeats per question, medians; "
          f"{os.cpu_count()} cores, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| page updated every | question | /v1 s | browser s | browser / API (median of pairs) | same answer "
          "| /v1 text chunks | the chat's text changed on the page | server CPU s, /v1 / browser | Chromium CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stream_seconds, results in runs.items():
        ratios = []
        for question, r in results.items():
            api, page = statistics.median(r["api"]), statistics.median(r["browser"])
            ratios += r["ratio"]
            print(f"| {stream_seconds:g} s | {question} | {api:.2f} | {page:.2f} | {statistics.median(r['ratio']):.2f}x | "
                  f"{sum(r['same'])}/{len(r['same'])} | {statistics.median(r['chunks']):g} | "
                  f"{statistics.median(r['updates']):g} | {statistics.median(r['api_server_cpu']):.1f} / "
                  f"{statistics.median(r['browser_server_cpu']):.1f} | {statistics.median(r['browser_cpu']):.1f} |")
        print(f"| {stream_seconds:g} s | **all pairs** | | | **{statistics.median(ratios):.2f}x** | | | | | |")
    print("\nbar: the browser within 1.15x of /v1")


if __name__ == "__main__":
    main()
