"""The app in a real browser: `app.py` on a free port, headless Chromium (Debian's) driven by
Playwright. Ingest the sample corpus, send a message, see the answer and the selection panel; stop
a message mid-answer and see that nothing of it stayed; find nothing of a message in the
browser's storage, and a second tab's message refused while the first is answered.

The chat model is the tiny Llama of tests/tiny.py saved as a folder, made to walk through its
vocabulary of words so that its (meaningless) answer is visible text that does not loop for a while. The embedder is the real
default. Skipped only where Chromium or Playwright is absent, and never on CI, which installs both
(`make test`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from sift_chat.settings import ChatSettings

from .served import served_app
from .tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token"  # app.py's --token: what the printed address carries
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
FOUNDING = ("founding.md", "town-history.txt", "visitor-leaflet.html")  # the founding, told three times
SAMPLE = ROOT / "corpora" / "brindlemoor"


def _browser_or_skip():
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium; `make test` does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install -r requirements-dev.txt)")
        sync_playwright = None
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must have it")
        pytest.skip(reason)
    return sync_playwright


def _save_tiny_chat_model(folder: Path) -> Path:
    """The tiny Llama made to walk through the words of its vocabulary: its layers add nothing to
    the residual stream (o_proj and down_proj zero), so the last hidden state is the current
    token's, and an untied head scores the next word of a fixed cycle highest. Its answer is
    visible words that repeat themselves only after the whole cycle (over a thousand tokens, its
    tokenizer trained on the sample corpus), so the engine's loop stop leaves a long answer."""
    tokenizer = tiny_tokenizer(" ".join(p.read_text() for p in sorted(SAMPLE.iterdir())), vocab_size=2000)
    model = tiny_model(tokenizer)
    words = [t for t in range(len(tokenizer)) if tokenizer.decode([t], skip_special_tokens=True).strip().isalpha()]
    cycle = [words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.get_input_embeddings().weight
        head = torch.zeros_like(embeddings)
        for token, following in zip(cycle, cycle[1:] + cycle[:1]):
            head[following] = embeddings[token] / embeddings[token].norm()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def browser_driver():
    return _browser_or_skip()


@pytest.fixture
def app_url(tmp_path, browser_driver):
    model = _save_tiny_chat_model(tmp_path / "tiny-chat-model")
    with served_app(tmp_path / "data", "--host", "127.0.0.1", "--chat-model", str(model),
                    env={"SIFT_CHAT_TOKEN": TOKEN}, ready_headers={"Authorization": f"Bearer {TOKEN}"}) as served:
        yield f"{served.url}?token={TOKEN}"  # the address app.py prints: the page keeps the token as a cookie


@contextlib.contextmanager
def _chromium_page(tmp_path, browser_driver, app_url):
    """Debian's Chromium with a fresh profile, one page open on the app: (browser, page)."""
    with browser_driver() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(app_url)
            yield browser, page
        finally:
            browser.close()


def test_ingest_the_sample_ask_and_see_the_answer_and_its_passages(tmp_path, browser_driver, app_url):
    from playwright.sync_api import expect

    screenshot = tmp_path / "app.png"
    with _chromium_page(tmp_path, browser_driver, app_url) as (browser, page):

        # the sample corpus is offered on an empty store
        page.get_by_role("tab", name="Corpus").click()
        expect(page.locator("#corpus-summary")).to_contain_text("The corpus is empty")
        page.get_by_role("button", name="Add the sample corpus").click()
        expect(page.locator("#corpus-summary")).to_contain_text("10 documents, 10 passages", timeout=120_000)
        expect(page.locator("#documents")).to_contain_text("lighthouse.md")

        # an empty message gets a visible message
        page.get_by_role("tab", name="Chat").click()
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text("The message is empty")

        page.locator("#message textarea").fill(QUESTION)
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text("Answered in", timeout=120_000)

        chat = page.locator("#chatbot")
        expect(chat).to_contain_text(QUESTION)
        answer = chat.locator("[data-testid='bot']").last
        assert re.search(r"\w{3}", answer.inner_text()) and "no answer" not in answer.inner_text()

        panel = page.locator("#passages")
        expect(panel.locator(".sc-pick").first).to_be_visible()
        cards = panel.locator(".sc-pick")
        picks = ChatSettings().passages  # the default number, and the default mode learns from each
        shown = cards.count()
        assert shown in (picks, picks + 1)  # + the lead's own card when SIFT did not pick it
        text = panel.inner_text()
        reductions = [float(x) for x in re.findall(r"−(\d\.\d{3}) σ²", text)]
        assert len(reductions) == picks and reductions[0] > reductions[-1] > 0
        assert "lighthouse.md" in text and any(name in text for name in FOUNDING)
        # numbered as cited; what the model did with them (the default mode reads one passage: the
        # pre-selection's lead, numbered [1] at whichever step picked it; and learns from the picks)
        read = [card for card in cards.all_inner_texts() if card.startswith("[1]")]
        assert len(read) == 1 and "read" in read[0].split("\n")[0], read
        assert f"read passage [1] in its prompt and learned from {picks}" in text
        assert text.count("learned from") >= picks
        expect(page.locator("#coverage")).to_contain_text("What your documents say about this question")
        expect(page.locator("#timings")).to_contain_text("generate")
        expect(page.locator("#variance-chart")).to_contain_text("SIFT")

        # the chat is listed, and reopens after "New chat"
        expect(page.locator("#chat-list")).to_contain_text(QUESTION)
        page.locator("#new-chat").click()
        expect(chat).not_to_contain_text(QUESTION)
        page.locator("#chat-list").get_by_text(QUESTION).click()
        expect(chat).to_contain_text(QUESTION)
        expect(panel.locator(".sc-pick")).to_have_count(shown)
        page.screenshot(path=str(screenshot), full_page=True)

        # Stop mid-answer: nothing stored, no new chat listed, the message back in the box
        page.locator("#new-chat").click()
        page.locator("#settings").get_by_text("Settings").click()
        tokens = page.locator("#max-new-tokens input[type=number]")
        tokens.fill("1024")
        tokens.press("Enter")
        second = "When is the lantern festival?"
        page.locator("#message textarea").fill(second)
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text("Generating the answer", timeout=120_000)
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped while writing the answer", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("nothing of this message was stored")
        expect(page.locator("#message textarea")).to_have_value(second)
        expect(page.locator("#chat-list")).not_to_contain_text(second)
        expect(page.locator("#chat-list")).to_contain_text(QUESTION)  # the earlier chat stays

        # uploads: a note is ingested, a binary file is reported and skipped
        (tmp_path / "harbour.md").write_text("The harbour master of Skellport is Ada Quill.")
        (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
        page.get_by_role("tab", name="Corpus").click()
        page.locator("#uploads input[type=file]").set_input_files(
            [str(tmp_path / "harbour.md"), str(tmp_path / "blob.bin")])
        expect(page.locator("#uploads")).to_contain_text("blob")  # uploaded (shown as "blob .bin")
        page.locator("#ingest").click()
        expect(page.locator("#ingest-report")).to_contain_text("1 added", timeout=60_000)
        expect(page.locator("#ingest-report")).to_contain_text("blob.bin: binary file")
        expect(page.locator("#corpus-summary")).to_contain_text("11 documents")
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("SIFT_CHAT_SCREENSHOT"):  # keep a copy to look at
        shutil.copyfile(screenshot, os.environ["SIFT_CHAT_SCREENSHOT"])


def test_no_prompt_or_answer_is_kept_in_the_browser_and_a_second_message_is_refused(tmp_path, browser_driver, app_url):
    """Gradio's run history would keep every call's inputs and outputs in localStorage (shown on
    the footer's "Runs" page); it is off, so after a message neither storage holds its text. A
    second message sent while the first is being answered is refused in one line."""
    from playwright.sync_api import expect

    with _chromium_page(tmp_path, browser_driver, app_url) as (browser, page):
        page.get_by_role("tab", name="Corpus").click()
        page.get_by_role("button", name="Add the sample corpus").click()
        expect(page.locator("#corpus-summary")).to_contain_text("10 documents", timeout=120_000)

        page.get_by_role("tab", name="Chat").click()
        page.locator("#message textarea").fill(QUESTION)
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text("Answered in", timeout=120_000)
        answer = page.locator("#chatbot [data-testid='bot']").last.inner_text().strip()
        assert len(answer) > 10
        page.wait_for_timeout(1000)  # anything Gradio would store after the call has been stored
        stored = page.evaluate("() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
        assert QUESTION not in stored and answer[:40] not in stored and "Brindlemoor" not in stored
        expect(page.get_by_text("Runs", exact=True)).to_have_count(0)  # no run history in the footer

        # a second message (from another tab of this browser: the same user) while the first is
        # still being answered: refused, the first goes on. The other tab is ready before the first
        # message is sent, so the second follows it by one click however loaded the machine is.
        other = browser.new_page()
        other.goto(app_url)
        expect(other.locator("#chat-list")).to_contain_text(QUESTION)  # the same user's page
        other.locator("#message textarea").fill("And who keeps the lighthouse?")
        page.locator("#settings").get_by_text("Settings").click()
        tokens = page.locator("#max-new-tokens input[type=number]")
        tokens.fill("1024")
        tokens.press("Enter")
        page.locator("#message textarea").fill("When is the lantern festival?")
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text(re.compile("Fine-tuning|Generating the answer"),
                                                        timeout=120_000)
        other.locator("#send").click()
        expect(other.get_by_text("A message of yours is waiting or being answered already").first).to_be_visible()
        expect(other.locator("#message textarea")).to_have_value("And who keeps the lighthouse?")  # not lost
        expect(page.locator("#status")).to_contain_text("Answered in", timeout=120_000)  # the first goes on
        other.locator("#send").click()  # and once it is answered, the second may come
        expect(other.locator("#status")).to_contain_text("Answered in", timeout=120_000)


def _harbour_log() -> str:
    """A document of several passages: the answer to "Who keeps the Skellport light?" near its end,
    after markup that must stay text."""
    days = [f"Day {n}. The tide at Brindlemoor turned at {n % 12 + 1} o'clock; the ferry crossed twice, and "
            f"the net menders counted {n * 7} floats on the quay." for n in range(1, 25)]
    days.insert(20, "<img src=x onerror=\"document.title='markup ran'\"> The keeper of the Skellport light is "
                    "Ada Quill, who paints every buoy vermilion and winds the lamp at dusk.")
    return "\n\n".join(days) + "\n"


def _marked_in_view(page) -> str:
    """The passage the document pane marks, once it is scrolled into view; its text."""
    from playwright.sync_api import expect

    mark = page.locator("#document-pane mark#sc-doc-passage")
    expect(mark).to_be_visible()
    expect(mark).to_be_in_viewport()
    return " ".join(mark.inner_text().split())


def test_a_citation_or_a_pick_opens_the_document_at_the_passage_marked(tmp_path, browser_driver, app_url):
    """Click a pick in the panel, a citation [n] in the answer, or a pick in Compare: the document
    opens over the page, scrolled to the passage, its characters marked; Close and Esc close it."""
    from playwright.sync_api import expect

    (tmp_path / "harbour-log.txt").write_text(_harbour_log())
    screenshot = tmp_path / "document.png"
    with _chromium_page(tmp_path, browser_driver, app_url) as (browser, page):
        page.get_by_role("tab", name="Corpus").click()
        page.get_by_role("button", name="Add the sample corpus").click()
        expect(page.locator("#corpus-summary")).to_contain_text("10 documents", timeout=120_000)
        page.locator("#uploads input[type=file]").set_input_files([str(tmp_path / "harbour-log.txt")])
        expect(page.locator("#uploads")).to_contain_text("harbour")
        page.locator("#ingest").click()
        expect(page.locator("#ingest-report")).to_contain_text("1 added", timeout=60_000)

        page.get_by_role("tab", name="Chat").click()
        page.locator("#message textarea").fill("Who keeps the Skellport light?")
        page.locator("#send").click()
        expect(page.locator("#status")).to_contain_text("Answered in", timeout=120_000)
        pane = page.locator("#document-pane")
        expect(pane.locator(".sc-doc")).to_have_count(0)  # closed until something is opened

        # a pick: the passage read first ([1], the name's), in its document of several passages
        lead = page.locator("#passages .sc-pick[data-number='1']")
        expect(lead).to_contain_text("harbour-log.txt")
        lead.locator(".sc-source").click()
        expect(pane.locator(".sc-doc")).to_be_visible()
        expect(pane).to_contain_text("harbour-log.txt")
        expect(pane).to_contain_text("passage [1]: characters")
        marked = _marked_in_view(page)
        assert "Ada Quill" in marked and marked.startswith(" ".join(lead.locator(".sc-text").inner_text().split())[:200])
        whole = " ".join(pane.locator(".sc-doc-text").inner_text().split())
        assert whole.startswith("Day 1.") and len(whole) > len(marked) + 500  # the document, not just the passage
        assert '<img src=x onerror="document.title=' in whole  # shown as text
        expect(pane.locator("img")).to_have_count(0)
        assert page.title() != "markup ran"
        page.screenshot(path=str(screenshot))
        pane.get_by_role("button", name="Close the document").click()
        expect(pane.locator(".sc-doc")).to_have_count(0)

        # a citation [n] in the answer: the passage it stands for, as its card shows it
        citation = page.locator("#chatbot [data-testid='bot']").last.locator("a[href*='#sc-passage-']").first
        expect(citation).to_be_visible()
        number = citation.inner_text().strip("[]")
        pages = len(browser.pages)
        citation.click()
        expect(pane).to_contain_text(f"passage [{number}]: characters")
        card = page.locator(f"#passages .sc-pick[data-number='{number}'] .sc-text").first
        assert _marked_in_view(page).startswith(" ".join(card.inner_text().split())[:150])
        assert len(browser.pages) == pages and "#sc-passage" not in page.url  # no new tab, no navigation
        page.keyboard.press("Escape")
        expect(pane.locator(".sc-doc")).to_have_count(0)

        # from the keyboard: a card takes the focus (Tab reaches it), Enter opens, Esc closes and
        # gives the focus back to the card
        lead.focus()
        expect(lead).to_be_focused()
        page.keyboard.press("Enter")
        expect(pane).to_contain_text("passage [1]: characters")
        expect(pane.get_by_role("button", name="Close the document")).to_be_focused()
        page.keyboard.press("Escape")
        expect(pane.locator(".sc-doc")).to_have_count(0)
        expect(lead).to_be_focused()

        # a pick in Compare's panels
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-prompt textarea").fill("Who keeps the Skellport light?")
        page.locator("#compare-go").click()
        expect(page.locator("#compare-status")).to_contain_text("Done", timeout=180_000)
        pick = page.locator("#sift-passages .sc-pick").first
        pick.click()
        expect(pane.locator(".sc-doc")).to_be_visible()
        assert _marked_in_view(page).startswith(" ".join(pick.locator(".sc-text").inner_text().split())[:150])
        pane.locator(".sc-doc-backdrop").click(position={"x": 5, "y": 5})  # beside the pane
        expect(pane.locator(".sc-doc")).to_have_count(0)

        # a document in the Corpus tab's list: the whole document from its beginning, nothing marked
        page.get_by_role("tab", name="Corpus").click()
        page.locator("#documents").get_by_text("harbour-log.txt", exact=True).click()
        expect(pane.locator(".sc-doc")).to_be_visible()
        expect(pane.locator(".sc-doc-name")).to_have_text("harbour-log.txt")
        expect(pane.locator("mark")).to_have_count(0)
        assert " ".join(pane.locator(".sc-doc-text").inner_text().split()).startswith("Day 1.")
        page.keyboard.press("Escape")
        expect(pane.locator(".sc-doc")).to_have_count(0)
    if os.environ.get("SIFT_CHAT_SCREENSHOT"):  # keep a copy to look at
        shutil.copyfile(screenshot, Path(os.environ["SIFT_CHAT_SCREENSHOT"]).with_suffix(".document.png"))
