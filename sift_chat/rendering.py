"""What the app shows of one answer, a document and a search, as HTML or Markdown: pure functions
of the application layer's values (`Panel`, `DocumentView`, `SearchResult`), with no Service and no
caller. `sift_chat.ui.Handlers` and the layout (`sift_chat.layout`) call them.

    side panel   how much the documents say (σ² before and after), the σ² curves, the picks as
                 cards, what a comparison changed, the time per stage
    citations    an answer's markers [n] as links to their passages, and the document pane a
                 citation or a card opens
    search       the Corpus tab's search results as cards
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from .corpus_service import SearchResult
from .document_view import DocumentView
from .panel import Panel, shown_name
from .vocabulary import METHOD_LABELS


# -- one answer's selection, as the side panel shows it ---------------------------------------


def coverage_verdict(prior: float, final: float) -> str:
    """How much the documents say about a prompt, from the σ² their passages leave (rough bands)."""
    share = final / prior if prior > 0 else 1.0
    if share <= 0.5:
        return "a lot"
    if share <= 0.8:
        return "something"
    return "little"


def render_coverage(panel: Panel | None, note: str = "") -> str:
    if panel is None:
        return note or "No passages were used for this answer."
    if not panel.picks:
        return f"No passage was selected ({panel.stop_reason}): the answer comes from the base model."
    prior, final = panel.prior_variance, panel.final_variance
    removed = 1 - final / prior if prior > 0 else 0.0
    nn = (f" NN's {len(panel.nn_variance)} nearest passages would leave σ² {panel.nn_variance[-1]:.2f}."
          if panel.nn_variance and panel.method != "nn" else "")
    return (f"**What your documents say about this question: {coverage_verdict(prior, final)}**. "
            f"σ² {prior:.2f} → {final:.2f} after {len(panel.picks)} {METHOD_LABELS.get(panel.method, panel.method)} "
            f"picks: {removed:.0%} of the uncertainty removed.{nn}\n\n"
            "<small>σ² is the uncertainty about your question that the chosen passages leave: 1 when your "
            "documents say nothing related, lower the more they say. It describes your documents, not the "
            "answer: check the answer against the passages it cites.</small>")


def render_variance(panel: Panel | None, *others: Panel | None):
    """σ² after each step (0 = the prior) for the panel's method and for NN, as a long table
    (columns step, variance, method); None when there is nothing to draw."""
    import pandas as pd

    rows = []
    for item in (panel, *others):
        if item is None:
            continue
        label = METHOD_LABELS.get(item.method, item.method)
        curve = [item.prior_variance] + [p["posterior_variance"] for p in item.picks]
        rows += [{"step": i, "variance": float(v), "method": label} for i, v in enumerate(curve)]
    if panel is not None and panel.method != "nn" and panel.nn_variance \
            and not any(o is not None and o.method == "nn" for o in others):
        curve = [panel.prior_variance] + list(panel.nn_variance)
        rows += [{"step": i, "variance": float(v), "method": "NN"} for i, v in enumerate(curve)]
    if not rows:
        return None  # nothing to draw (an empty frame would leave Gradio's chart without lines later)
    return pd.DataFrame(rows, columns=["step", "variance", "method"])


def _usage(panel: Panel) -> str:
    """What the model did with the passages, in the words of the panel's caption."""
    read = "passage [1]" if len(panel.read) == 1 else f"passages [1]–[{len(panel.read)}]"
    steps = sum(1 for x in panel.losses if isinstance(x, (int, float)) and math.isfinite(x))
    taught = len(panel.only_learned)
    not_read = f" that {read} does not" if panel.read else ""
    taught = f" {taught} of them hold words of the answer{not_read}: what the steps put into it." if taught else ""
    passes = len(panel.losses) // len(panel.picks) if panel.picks else 1
    if panel.together:
        each = "one fine-tuning step on all of them" if passes <= 1 else f"{passes} fine-tuning steps on all of them"
    else:
        each = ("one fine-tuning step each" if passes <= 1 else f"{passes} fine-tuning steps each, pass after pass"
                ) + ", in this order"
    apart = " It read each on its own and drew every word of the answer from all of them." if len(panel.read) > 1 else ""
    if panel.learned and panel.read:
        return f"The model read {read} in its prompt and learned from {len(panel.picks)} ({each}).{apart}{taught}"
    if panel.learned:
        return (f"The model learned from these {len(panel.picks)} passages ({each}"
                f"{'' if steps else '; the steps are still to come'}); it did not read them in its prompt."
                f"{taught}")
    if panel.read:
        return (f"The model read {read} in its prompt; it learned from none ({panel.mode} mode takes no "
                f"fine-tuning step).{apart}")
    return "Selected passages (the model has not used them yet)."


def render_passages(panel: Panel | None, shared: set[int] | frozenset = frozenset()) -> str:
    """The picks as cards: their citation number, step, uncertainty reduction (with a bar), σ²
    after, similarity, loss of the step, source document and characters, the passage text; what
    the model did with each (read, learned from, cited). Repeats and passages picked by both
    methods (in a comparison) are marked."""
    if panel is None or not panel.picks:
        return "<div class='sc-empty'>No passages yet: ask a question.</div>"
    numbers, read, cards = panel.numbers, set(panel.read), []
    for pick in panel.picks:
        step, number = pick["step"], numbers[pick["passage_id"]]
        loss = panel.losses[step - 1] if step <= len(panel.losses) else None
        share = pick["uncertainty_reduction"] / panel.prior_variance if panel.prior_variance > 0 else 0
        badges = "".join(f"<span class='sc-badge {cls}'>{label}</span>" for label, cls, on in (
            ("cited", "sc-cited", number in panel.citations and not pick["repeat"]),
            ("read", "sc-read", pick["passage_id"] in read and not pick["repeat"]),
            ("learned from", "sc-learned", panel.learned),
            ("repeat", "", pick["repeat"]),
            ("★ both", "sc-shared", pick["passage_id"] in shared)) if on)
        taught = panel.only_learned.get(pick["passage_id"]) if not pick["repeat"] else None
        if taught:  # the answer says what only this learned passage says: the steps put it there
            badges += (f"<span class='sc-badge sc-taught' title='words of the answer that no passage read holds'>"
                       f"answer words only here: {html.escape(', '.join(taught))}</span>")
        text = " ".join(pick["text"].split())
        text = text if len(text) <= 700 else text[:699] + "…"
        loss_text = f" · loss {loss:.3f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
        where = _where(pick)
        cards.append(
            f"<div class='sc-pick' data-passage='{pick['passage_id']}' data-number='{number}'{_opens(pick)}>"
            f"<div class='sc-head'><b>[{number}]</b> step {step} · "
            f"<span class='sc-reduction'>−{pick['uncertainty_reduction']:.3f} σ²</span> "
            f"→ {pick['posterior_variance']:.3f} · similarity {pick['similarity']:.2f}{loss_text} · "
            f"<span class='sc-source' title='{html.escape(pick['path'], quote=True)}{where}'>"
            f"{html.escape(Path(pick['path']).name)}{where}</span> {badges}</div>"
            f"<div class='sc-bar'><span style='width:{max(0.0, min(share, 1.0)) * 100:.1f}%'></span></div>"
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    for lead in reversed(panel.unpicked_leads):  # read, though the method did not pick it
        number, where = numbers[lead["passage_id"]], _where(lead)
        badges = "".join(f"<span class='sc-badge {cls}'>{label}</span>" for label, cls, on in (
            ("cited", "sc-cited", number in panel.citations), ("read", "sc-read", lead["passage_id"] in read)) if on)
        text = " ".join(lead["text"].split())
        text = text if len(text) <= 700 else text[:699] + "…"
        match = "best match" if number == 1 else f"match {number}"
        cards.insert(0,
            f"<div class='sc-pick sc-lead' data-passage='{lead['passage_id']}' data-number='{number}'{_opens(lead)}>"
            f"<div class='sc-head'><b>[{number}]</b> the pre-selection's {match} (by words and meaning), not picked "
            f"by {html.escape(panel.method)} · <span class='sc-source' title='{html.escape(lead['path'], quote=True)}"
            f"{where}'>{html.escape(Path(lead['path']).name)}{where}</span> {badges}</div>"
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    header = (f"<div class='sc-caption'>{html.escape(_usage(panel))} [n] is how the answer cites a passage; "
              f"−x σ² is how much uncertainty each removed (selection stopped: {html.escape(panel.stop_reason)}).</div>")
    return f"<div class='sc-picks'>{header}{''.join(cards)}</div>"


def _where(passage: dict) -> str:
    return f":{passage['start_char']}–{passage['end_char']}" if passage.get("start_char") is not None else ""


def what_differed(nn: Panel, sift: Panel, nn_answer: str, sift_answer: str) -> str:
    """One line on what a comparison changed: the picks only one method made, the σ² each left,
    the mean loss of each method's steps (a high loss: the passage was new to the model) and
    whether the answers differ."""
    only_sift = [p for p in sift.distinct_picks if p["passage_id"] not in nn.passage_ids]
    only_nn = [p for p in nn.distinct_picks if p["passage_id"] not in sift.passage_ids]
    picks = ("They picked the same passages." if not only_sift and not only_nn else
             f"SIFT picked {len(only_sift)} passage{'s' * (len(only_sift) != 1)} NN did not "
             f"({', '.join(Path(p['path']).name for p in only_sift[:3])}{', …' if len(only_sift) > 3 else ''}), "
             f"NN {len(only_nn)} SIFT did not.")
    variance = f"σ² left: NN {nn.final_variance:.2f}, SIFT {sift.final_variance:.2f}."

    def mean_loss(panel: Panel) -> float | None:
        losses = [x for x in panel.losses if isinstance(x, (int, float)) and math.isfinite(x)]
        return sum(losses) / len(losses) if losses else None

    losses = (f" Mean step loss: NN {mean_loss(nn):.2f}, SIFT {mean_loss(sift):.2f}."
              if mean_loss(nn) is not None and mean_loss(sift) is not None else "")
    same = " ".join(nn_answer.split()) == " ".join(sift_answer.split())
    return f"{picks} {variance}{losses} {'The answers are the same.' if same else 'The answers differ.'}"


def _opens(passage: dict) -> str:
    """The attributes that make a card open its passage's document in the pane (a click, or Enter
    or Space once focused: the layout's page script); none for a removed document's passage."""
    if passage.get("start_char") is None:
        return ""
    return _opening(int(passage["passage_id"]))


def _opening(passage_id: int) -> str:
    return f" data-open-passage='{passage_id}' tabindex='0' role='button' title='Open the document at this passage'"


# -- citations, and the document they open ---------------------------------------------------

CITATION_MARK = re.compile(r"\[(\d+)\](?!\()")  # [n], not already a link's text


def link_citations(answer: str, passage_ids: list[int]) -> str:
    """The answer (Markdown) with each marker [n] a link to passage n of `passage_ids` (the
    answer's numbered passages, `Panel.numbered`): `#sc-passage-<id>`, which the page opens in the
    document pane. A marker without a passage stays as it is."""
    def linked(match: re.Match) -> str:
        n = int(match.group(1))
        return f"[[{n}]](#sc-passage-{int(passage_ids[n - 1])})" if 1 <= n <= len(passage_ids) else match.group(0)

    return CITATION_MARK.sub(linked, answer)


def render_document(view: DocumentView, collection: str, number: int | None = None) -> str:
    """The document pane: the document's name, its collection and where the passage is, then its
    stored text (HTML-escaped: a document never becomes markup) with the passage in a <mark> the
    pane scrolls to."""
    before, passage, after = (html.escape(part) for part in view.parts())
    if view.passage_id is not None:
        cited = f"passage [{number}]" if number else "the passage"
        where = f"{cited}: characters {view.passage_start}–{view.passage_end} of {view.length}"
    else:
        where = f"{view.length} characters"
    if view.start > 0 or view.end < view.length:
        where += f" (characters {view.start}–{view.end} shown)"
    marked = f"<mark id='sc-doc-passage' class='sc-doc-passage'>{passage}</mark>" if passage else ""
    text = f"{'…' if view.start > 0 else ''}{before}{marked}{after}{'…' if view.end < view.length else ''}"
    name = html.escape(view.name)
    return (f"<div class='sc-doc-backdrop'><div class='sc-doc' role='dialog' aria-modal='true' aria-label='{name}' "
            f"data-document='{view.document_id}'><div class='sc-doc-head'><div><b class='sc-doc-name'>{name}</b> · "
            f"{html.escape(collection)}<br><small>{html.escape(where)}</small></div>"
            f"<button type='button' class='sc-doc-close' aria-label='Close the document'>Close ✕</button></div>"
            f"<div class='sc-doc-text'>{text}</div></div></div>")


def render_timings(panel: Panel | None, seconds: dict | None = None) -> str:
    seconds = seconds if seconds is not None else (panel.seconds if panel else {})
    parts = []
    for name in ("embed", "select", "fine-tune", "generate"):
        if name in seconds:
            extra = ""
            steps = len([x for x in (panel.losses if panel else []) if x is not None])
            if name == "fine-tune" and steps:
                extra = f" ({steps} steps, {seconds[name] / steps:.2f} s each)"
            parts.append(f"{name} {seconds[name]:.2f} s{extra}")
    if "first_token" in seconds:
        parts.append(f"first word after {seconds['first_token']:.2f} s")
    lines = ["**Time per stage:** " + " · ".join(parts)] if parts else []
    losses = [x for x in (panel.losses if panel else []) if isinstance(x, (int, float)) and math.isfinite(x)]
    if losses:
        lines.append("**Loss per step:** " + " → ".join(f"{x:.3f}" for x in losses))
    return "\n\n".join(lines)


# -- the Corpus tab's search -----------------------------------------------------------------


def render_search(result: SearchResult) -> str:
    """The passages a chat message would pre-select first, as cards (rank, similarity, the
    document's shown name and characters, the text), with the words that were searched."""
    if not result.passages:
        return "<div class='sc-empty'>Nothing found: the corpus you read is empty.</div>"
    words = ", ".join(result.terms) or "none (only meaning)"
    cards = []
    for rank, (passage, similarity) in enumerate(zip(result.passages, result.similarities), 1):
        text = " ".join(passage.text.split())
        text = text if len(text) <= 500 else text[:499] + "…"
        where = f":{passage.start_char}–{passage.end_char}"
        cards.append(
            f"<div class='sc-pick' data-passage='{passage.id}'{_opening(passage.id)}><div class='sc-head'><b>{rank}.</b> "
            f"similarity {similarity:.2f} · <span class='sc-source' title='{html.escape(shown_name(passage), quote=True)}"
            f"{where}'>{html.escape(shown_name(passage))}{where}</span></div>"  # never the server's path
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    caption = (f"<div class='sc-caption'>The passages a chat message saying this would pre-select first, "
               f"by meaning and by its rarest words (searched: {html.escape(words)}).</div>")
    return f"<div class='sc-picks'>{caption}{''.join(cards)}</div>"
