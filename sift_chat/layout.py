"""The app's layout: the Gradio Blocks, and the wiring of its components to the handlers
(`sift_chat.ui.Handlers`); Gradio-specific and thin. `sift_chat.server` mounts it beside the API.

Every event asks `access` who calls, from the server's side of the request: Gradio's signed-in
user (`--auth`) or the Hugging Face profile of the OAuth session (on a Space); nothing the browser
sends names an owner, and no key is kept in the browser.
"""

from __future__ import annotations

import gradio as gr

from .access import SHARED, Access, Caller
from .adaptation import LEARNING_RATE_MAX
from .settings import READ_PASSAGES_MAX
from .corpus_service import MAX_UPLOAD_BYTES
from .document_view import NotReadable
from .guard import PRIVATE, GuardedBlocks
from .panel import SETTING_NAMES, default_settings
from .rendering import render_coverage, render_passages, render_timings, render_variance
from .ui import DEMO_QUESTION, Handlers
from .vocabulary import CONTRAST_TARGET_LABELS, CONTRAST_TARGETS, METHOD_LABELS, METHODS, MODE_LABELS, MODES


# -- the layout --------------------------------------------------------------------------------

CSS = """
.sc-picks { display: flex; flex-direction: column; gap: 8px; }
.sc-caption { font-size: 0.85em; opacity: 0.75; }
.sc-pick { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; }
.sc-head { font-size: 0.9em; }
.sc-reduction { font-weight: 600; color: var(--color-accent); }
.sc-source { font-family: var(--font-mono); }
.sc-badge { font-size: 0.75em; border-radius: 6px; padding: 1px 6px; margin-left: 4px;
            background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.sc-shared { background: #fde68a; color: #1f2937; }
.sc-cited { background: #bbf7d0; color: #14532d; }
.sc-read { background: #bfdbfe; color: #1e3a8a; }
.sc-learned { background: #e9d5ff; color: #4c1d95; }
.sc-taught { background: #fef3c7; color: #78350f; }
.sc-bar { height: 4px; background: var(--background-fill-secondary); border-radius: 2px; margin: 4px 0; }
.sc-bar span { display: block; height: 4px; background: var(--color-accent); border-radius: 2px; }
.sc-text { font-size: 0.88em; white-space: pre-wrap; max-height: 9em; overflow: auto; }
.sc-empty { opacity: 0.7; padding: 8px; }
[data-open-passage] { cursor: pointer; }
.sc-pick[data-open-passage]:hover { border-color: var(--color-accent); }
.sc-pick[data-open-passage] .sc-source { text-decoration: underline; }
.sc-doc-backdrop { position: fixed; inset: 0; z-index: 1000; background: rgba(15, 23, 42, 0.45);
                   display: flex; align-items: center; justify-content: center; }
.sc-doc { width: min(900px, 92vw); height: 84vh; display: flex; flex-direction: column; border-radius: 10px;
          background: var(--background-fill-primary); box-shadow: 0 10px 40px rgba(0, 0, 0, 0.35); }
.sc-doc-head { display: flex; justify-content: space-between; align-items: flex-start; gap: 12px;
               padding: 10px 14px; border-bottom: 1px solid var(--border-color-primary); }
.sc-doc-name { font-family: var(--font-mono); }
.sc-doc-close { border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 2px 10px;
                background: var(--background-fill-secondary); cursor: pointer; white-space: nowrap; }
.sc-doc-text { flex: 1; overflow: auto; padding: 12px 16px; white-space: pre-wrap; line-height: 1.5;
               font-size: 0.92em; overflow-wrap: anywhere; }
.sc-doc-passage { background: #fde68a; color: #1f2937; border-radius: 3px; padding: 1px 0; }
"""

# The document pane's page script (gr.HTML's js_on_load): a click on a citation link [n]
# (#sc-passage-<id>, `rendering.link_citations`) or on a card that names a passage (data-open-passage),
# or Enter or Space on such a card once focused (the cards are tabbable buttons), anywhere on the
# page asks the server for the pane ("open" event); the pane then scrolls to the marked passage.
# Close, a click beside the pane or Esc empties it (no server call) and gives the focus back to
# what opened it. One listener for the page: the cards and the chat are re-rendered, this
# component stays.
DOCUMENT_PANE_JS = """
window.scOpenDocument = (data) => { window.scOpener = document.activeElement; trigger('open', data); };
window.scCloseDocument = () => {
  if (!props.value) return;
  props.value = '';
  const opener = window.scOpener;
  if (opener && opener.isConnected && opener.focus) opener.focus({preventScroll: true});
};
if (!window.scDocumentClicks) {
  window.scDocumentClicks = true;
  document.addEventListener('click', (event) => {
    const target = event.target instanceof Element ? event.target : null;
    if (!target) return;
    const link = target.closest('a[href*="#sc-passage-"]');
    const card = target.closest('[data-open-passage]');
    if (link) {
      event.preventDefault();
      event.stopPropagation();
      const number = parseInt(link.textContent.replace(/[^0-9]/g, ''), 10) || null;
      window.scOpenDocument({passage: link.getAttribute('href').split('#sc-passage-').pop(), number: number});
    } else if (card && !String(window.getSelection()).trim()) {
      window.scOpenDocument({passage: card.dataset.openPassage, number: parseInt(card.dataset.number, 10) || null});
    } else if (target.closest('.sc-doc-close') || target.matches('.sc-doc-backdrop')) {
      window.scCloseDocument();
    }
  }, true);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') { window.scCloseDocument(); return; }
    const card = event.target instanceof Element && event.target.matches('[data-open-passage]') ? event.target : null;
    if (card && (event.key === 'Enter' || event.key === ' ')) {
      event.preventDefault();
      window.scOpenDocument({passage: card.dataset.openPassage, number: parseInt(card.dataset.number, 10) || null});
    }
  });
}
watch('value', () => {
  const mark = element.querySelector('#sc-doc-passage');
  if (mark) mark.scrollIntoView({block: 'center'});
  const close = element.querySelector('.sc-doc-close');
  if (close) close.focus({preventScroll: true});
});
"""

HELP = {
    "method": "SIFT picks passages that each remove the most remaining uncertainty, skipping what "
              "an earlier pick already said. NN takes the most similar ones, duplicates included.",
    "mode": "Both (the default): read the best-matching passages and take one LoRA step on each selected passage, "
            "so the answer can use what the model learned. Context: read only (faster). "
            "Fine-tune: the steps alone. Off: the base model.",
    "context_contrast": "How much the answer favours what the passage says over what the model would say "
                        "without it (context-aware decoding: a second row in the same pass per word; 0: off).",
    "contrast_against": "What the answer is contrasted with: the model without the passage as the steps "
                        "adapted it, or the base model (which keeps what the steps taught in the contrast).",
    "passages": "At most this many passages, one fine-tuning step each (0: none).",
    "read_passages": "At most this many of the best-matching passages are read, each on its own, the answer "
                     "drawn from all of them: questions about facts in several documents need more than one.",
    "read_min_match": "Of those, a passage after the best is read only when it matches the question at least "
                      "this well relative to the best (0: always read them all).",
    "lam": "SIFT's λ: small favours diverse passages, large the most similar ones (λ→∞ repeats the nearest, as NN-F).",
    "adaptive": "Stop selecting once another passage would remove little uncertainty.",
    "min_reduction": "…when a pick removes less than this share of the prompt's initial uncertainty.",
    "learning_rate": "Step size of each LoRA step: larger learns more from each passage, and risks more.",
    "lora_layers": "Fine-tune only the top L layers (faster steps); 0 = all layers.",
    "max_new_tokens": "The longest answer, in tokens.",
}


def build(handlers: Handlers, *, access: Access | None = None):
    """The Gradio Blocks: chats and settings in the sidebar; Chat, Compare and Corpus tabs."""
    h = handlers
    access = access or Access()
    defaults = default_settings()
    skip = gr.skip

    def who(request: gr.Request | None, profile: gr.OAuthProfile | None) -> Caller:
        return access.caller(getattr(request, "username", None), getattr(profile, "username", None),
                             getattr(request, "session_hash", None) or "")

    # one-line errors, whatever is sent; only files this caller uploaded
    with GuardedBlocks(title="sift-chat", fill_height=True,
                       caller_key=lambda request: request_caller(access, request).key) as demo:
        chat_id = gr.State(None)
        turn = gr.State(None)  # the ticket of the message being sent: what Stop stops

        with gr.Sidebar(label="Chats", open=True, width=300):
            if access.mode == "space":
                gr.LoginButton(elem_id="sign-in")
            signed_in = gr.Markdown(elem_id="signed-in")
            if access.mode == "users":
                gr.Button("Sign out", link="/logout", size="sm", elem_id="sign-out")
            new_chat = gr.Button("New chat", variant="primary", elem_id="new-chat")
            chat_list = gr.Radio(choices=[], label="Your chats", elem_id="chat-list")
            with gr.Accordion("Rename or delete this chat", open=False):
                title = gr.Textbox(label="Title", max_lines=1, elem_id="chat-title")
                with gr.Row():
                    rename = gr.Button("Rename", size="sm")
                    delete = gr.Button("Delete", size="sm", variant="stop")
            with gr.Accordion("Settings", open=False, elem_id="settings"):
                method = gr.Radio([(METHOD_LABELS[m] + (" (repeats)" if m == "nnf" else ""), m) for m in METHODS],
                                  value=defaults["method"], label="Selection", info=HELP["method"])
                mode = gr.Radio([(MODE_LABELS[m], m) for m in MODES], value=defaults["mode"],
                                label="Use the passages to", info=HELP["mode"])
                context_contrast = gr.Slider(0, 3, value=defaults["context_contrast"], step=0.25,
                                             label="Stick to the passage", info=HELP["context_contrast"])
                contrast_against = gr.Radio([(CONTRAST_TARGET_LABELS[t], t) for t in CONTRAST_TARGETS],
                                            value=defaults["contrast_against"], label="Contrast against",
                                            info=HELP["contrast_against"])
                passages = gr.Slider(0, 32, value=defaults["passages"], step=1, label="Passages",
                                     info=HELP["passages"])
                read_passages = gr.Slider(1, READ_PASSAGES_MAX, value=defaults["read_passages"], step=1,
                                          label="Passages read (at most)", info=HELP["read_passages"])
                read_min_match = gr.Slider(0, 1, value=defaults["read_min_match"], step=0.05,
                                           label="Read others matching at least", info=HELP["read_min_match"])
                lam = gr.Number(value=defaults["lam"], label="λ", minimum=1e-6, info=HELP["lam"])
                adaptive = gr.Checkbox(value=defaults["adaptive"], label="Adaptive stopping", info=HELP["adaptive"])
                min_reduction = gr.Slider(0.001, 0.2, value=defaults["min_reduction"], step=0.001,
                                          label="Minimum reduction", info=HELP["min_reduction"])
                learning_rate = gr.Number(value=defaults["learning_rate"], label="Learning rate", minimum=0,
                                          maximum=LEARNING_RATE_MAX,
                                          info=HELP["learning_rate"])
                lora_layers = gr.Slider(0, h.engine.layer_count, value=defaults["lora_layers"], step=1,
                                        label="LoRA layers", info=HELP["lora_layers"])
                max_new_tokens = gr.Slider(16, 1024, value=defaults["max_new_tokens"], step=16,
                                           label="Maximum new tokens", info=HELP["max_new_tokens"],
                                           elem_id="max-new-tokens")
        settings = [method, mode, context_contrast, contrast_against, passages, read_passages, read_min_match, lam,
                    adaptive, min_reduction, learning_rate, lora_layers, max_new_tokens]

        gr.Markdown("# sift-chat\nChat with your documents. For every message the model picks the passages "
                    "that most reduce its uncertainty about your question (SIFT), takes one fine-tuning step "
                    "on each, reads the best-matching ones and answers, citing what it used; then it forgets the steps "
                    "again. (*Context* mode only reads.)")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot",
                                             feedback_options=None, buttons=["copy"])
                        status = gr.Markdown(elem_id="status")
                        with gr.Row():
                            message = gr.Textbox(placeholder="Ask about your documents…", show_label=False,
                                                 scale=6, max_lines=6, elem_id="message", autofocus=True)
                            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                            stop = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
                    with gr.Column(scale=2, elem_id="panel"):
                        gr.Markdown("### The passages behind the answer\n<small>Click an answer to see its "
                                    "passages.</small>")
                        coverage = gr.Markdown(elem_id="coverage")
                        gr.Markdown("**σ² after each step**, beside NN's for the same prompt")
                        chart = gr.LinePlot(None, x="step", y="variance", color="method",
                                            x_title="step (0 = the prior)", y_title="σ² (uncertainty)", color_title="",
                                            y_lim=[0, 1.05], height=300, show_label=False,
                                            elem_id="variance-chart")
                        picked = gr.HTML(render_passages(None), elem_id="passages")
                        timings = gr.Markdown(elem_id="timings")

            with gr.Tab("Compare", id="compare"):
                gr.Markdown("One prompt, **NN** and **SIFT** side by side, with the settings from the sidebar "
                            "(a mode that learns nothing compares *both*: reading the same first passage, the "
                            "methods differ in what they learn from). "
                            "★ marks a passage both picked. Nothing is stored.")
                with gr.Row():
                    compare_prompt = gr.Textbox(value=DEMO_QUESTION, show_label=False, scale=6,
                                                elem_id="compare-prompt")
                    compare_go = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-go")
                compare_status = gr.Markdown(elem_id="compare-status")
                compare_chart = gr.LinePlot(None, x="step", y="variance", color="method",
                                            x_title="step (0 = the prior)", y_title="σ² (uncertainty)", color_title="",
                                            y_lim=[0, 1.05], height=300, show_label=False)
                with gr.Row(equal_height=False):
                    with gr.Column():
                        gr.Markdown("### Nearest neighbours (NN)")
                        nn_coverage = gr.Markdown()
                        nn_picks = gr.HTML(render_passages(None), elem_id="nn-passages")
                        nn_answer = gr.Markdown(label="NN answer", elem_id="nn-answer")
                    with gr.Column():
                        gr.Markdown("### SIFT")
                        sift_coverage = gr.Markdown()
                        sift_picks = gr.HTML(render_passages(None), elem_id="sift-passages")
                        sift_answer = gr.Markdown(label="SIFT answer", elem_id="sift-answer")

            with gr.Tab("Corpus", id="corpus"):
                corpus_summary = gr.Markdown(elem_id="corpus-summary")
                with gr.Row(visible=False) as sample_row:
                    gr.Markdown("New here? Add a small sample corpus: notes about Brindlemoor, an invented "
                                "harbour town, with some facts repeated in other words.")
                    add_sample = gr.Button("Add the sample corpus", variant="primary", elem_id="add-sample")
                uploads = gr.File(label="Upload files (text, Markdown, HTML, source code, PDF; "
                                  f"at most {MAX_UPLOAD_BYTES // 2**20} MiB each)",
                                  file_count="multiple", type="filepath", elem_id="uploads")
                folder = gr.Textbox(label="Or a folder or file on this machine (admins)", visible=False,
                                    placeholder="~/notes", max_lines=1, elem_id="folder")
                to_shared = gr.Checkbox(False, label="Add to the shared library (every user reads it)", visible=False,
                                        elem_id="to-shared")
                ingest_go = gr.Button("Ingest", variant="primary", elem_id="ingest")
                ingest_report = gr.Markdown(elem_id="ingest-report")
                with gr.Accordion("Synced folders: a folder on this machine, kept in step", open=False,
                                  visible=False, elem_id="synced") as sync_box:
                    gr.Markdown("<small>Ingested at once, then new and changed files are ingested, deleted ones "
                                "removed, renamed ones renamed (not embedded again). A folder that disappears "
                                "(unmounted) keeps its documents until you stop syncing it.</small>")
                    sync_status = gr.Markdown(elem_id="sync-status")
                    with gr.Row():
                        sync_path = gr.Textbox(label="Folder to sync", placeholder="~/notes", max_lines=1, scale=4,
                                               elem_id="sync-path")
                        sync_add = gr.Button("Sync this folder", variant="primary", scale=1, elem_id="sync-add")
                    sync_shared = gr.Checkbox(False, label="Into the shared library (every user reads it)",
                                              visible=False, elem_id="sync-shared")
                    with gr.Row():
                        synced = gr.Dropdown(choices=[], label="Your synced folder", scale=3, elem_id="synced-folder",
                                             allow_custom_value=True)  # the handlers check whose it is
                        sync_now = gr.Button("Sync now", scale=1, elem_id="sync-now")
                        sync_refresh = gr.Button("Refresh", scale=1, elem_id="sync-refresh")
                    with gr.Row():
                        sync_remove = gr.Radio([("keep its documents", "keep"), ("remove its documents", "remove")],
                                               value="keep", label="When I stop syncing", scale=3)
                        sync_stop = gr.Button("Stop syncing", variant="stop", scale=1, elem_id="sync-stop")
                    sync_report = gr.Markdown(elem_id="sync-report")
                documents = gr.Dataframe(headers=["document", "collection", "passages", "size", "added"],
                                         datatype=["str", "str", "number", "str", "str"], interactive=False,
                                         label="Documents (click one to read it)", elem_id="documents")
                with gr.Row():
                    document = gr.Dropdown(choices=[], label="Document (yours, or the shared library's for admins)",
                                           scale=4)
                    remove = gr.Button("Remove from the corpus", variant="stop", scale=1)
                remove_report = gr.Markdown()
                with gr.Row():
                    search_text = gr.Textbox(label="Search your documents (as the chat finds passages: by meaning "
                                             "and by rare words such as names)", max_lines=1, scale=4,
                                             elem_id="corpus-search")
                    search_go = gr.Button("Search", scale=1, elem_id="corpus-search-go")
                search_results = gr.HTML(elem_id="corpus-search-results")

        # the document a citation or a card opens, over whichever tab is shown (empty: closed)
        document_pane = gr.HTML("", elem_id="document-pane", js_on_load=DOCUMENT_PANE_JS)

        panel_outputs = [coverage, chart, picked, timings]

        def show_panel(panel, note: str = "", seconds: dict | None = None):
            return [render_coverage(panel, note), render_variance(panel), render_passages(panel),
                    render_timings(panel, seconds)]

        def chats_update(caller: Caller, selected=None):
            return gr.update(choices=h.chat_choices(caller), value=selected)

        def corpus_view(caller: Caller):
            return [h.corpus_summary(caller), gr.update(visible=h.offers_sample()), h.documents(caller),
                    gr.update(choices=h.removable(caller), value=None), h.synced_folders(caller),
                    gr.update(choices=h.synced_choices(caller))]

        corpus_outputs = [corpus_summary, sample_row, documents, document, sync_status, synced]

        # page load: who this is, their chats, the corpus they read, what they may add
        def on_load(request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            greeting = (f"Signed in as **{caller.name}**{' (admin)' if caller.admin else ''}."
                        if caller.signed_in and caller.owner != SHARED else
                        "" if caller.signed_in else
                        "You are trying the demo: chat over the shared library. Sign in to add your own "
                        "documents and keep your chats.")
            return [greeting, chats_update(caller), gr.update(visible=caller.signed_in),
                    gr.update(visible=h.service.corpus.allow_server_paths and caller.admin),
                    gr.update(visible=caller.admin and caller.owner != SHARED), gr.update(visible=h.may_sync(caller)),
                    gr.update(visible=caller.admin and caller.owner != SHARED), *corpus_view(caller)]

        demo.load(on_load, None, [signed_in, chat_list, uploads, folder, to_shared, sync_box, sync_shared,
                                  *corpus_outputs])

        # chat
        def on_ticket(request: gr.Request, profile: gr.OAuthProfile | None):
            return h.new_turn(who(request, profile))

        def on_send(text, current, ticket, request: gr.Request, profile: gr.OAuthProfile | None, *values):
            caller = who(request, profile)
            for update in h.respond(text, current, caller, dict(zip(SETTING_NAMES, values)), ticket):
                if update.get("error"):
                    gr.Warning(update["error"])
                panel = (show_panel(update["panel"], "", update.get("seconds")) if "panel" in update
                         else [skip()] * 4)
                yield [update.get("history", skip()), update.get("status", skip()), update.get("message", skip()),
                       update.get("chat_id", skip()),
                       gr.update(choices=update["chats"], value=update.get("chat_id")) if "chats" in update else skip(),
                       *panel]

        chat_outputs = [chatbot, status, message, chat_id, chat_list, *panel_outputs]
        # the ticket first, outside the model's line (no concurrency limit), so that Stop reaches a message
        # still waiting; queued, so that its refusal of a second message shows
        for trigger in (send.click, message.submit):
            trigger(on_ticket, None, [turn], concurrency_limit=None).success(  # a second message is refused
                on_send, [message, chat_id, turn, *settings], chat_outputs,
                concurrency_id="model", concurrency_limit=1, show_progress_on=[chatbot])

        def on_stop(request: gr.Request, profile: gr.OAuthProfile | None):
            said = h.stop(who(request, profile))  # a stopped message reports where it stopped itself
            return skip() if said == "Stopping…" else said

        stop.click(on_stop, None, [status], queue=False)

        def on_open(selected, request: gr.Request, profile: gr.OAuthProfile | None):
            view = h.open_chat(selected, who(request, profile))
            if view["error"]:
                gr.Warning(view["error"])
            return [view["history"], view["chat_id"], view["title"], "", *show_panel(view["panel"])]

        chat_list.input(on_open, [chat_list], [chatbot, chat_id, title, status, *panel_outputs])

        def on_new(request: gr.Request, profile: gr.OAuthProfile | None):
            return [[], None, "", "", chats_update(who(request, profile)), *show_panel(None)]

        new_chat.click(on_new, None, [chatbot, chat_id, title, status, chat_list, *panel_outputs])
        chatbot.clear(on_new, None, [chatbot, chat_id, title, status, chat_list, *panel_outputs])  # stays stored

        def on_rename(current, new_title, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            problem = h.rename_chat(current, new_title, caller)
            if problem:
                gr.Warning(problem)
            return chats_update(caller, current)

        rename.click(on_rename, [chat_id, title], [chat_list])

        def on_delete(current, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            problem = h.delete_chat(current, caller)
            if problem:
                gr.Warning(problem)
                return [skip(), skip(), skip(), skip(), chats_update(caller, current), *[skip()] * 4]
            return [[], None, "", "", chats_update(caller), *show_panel(None)]

        delete.click(on_delete, [chat_id], [chatbot, chat_id, title, status, chat_list, *panel_outputs])

        def on_pick_message(current, event: gr.SelectData, request: gr.Request, profile: gr.OAuthProfile | None):
            index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            return show_panel(h.message_panel(current, who(request, profile), int(index or 0)),
                              "No passages were used for this answer.")

        chatbot.select(on_pick_message, [chat_id], panel_outputs)

        # compare
        def on_compare(prompt, request: gr.Request, profile: gr.OAuthProfile | None, *values):
            for update in h.compare(prompt, dict(zip(SETTING_NAMES, values)), who(request, profile)):
                if update.get("error"):
                    gr.Warning(update["error"])
                answers = [update.get("nn_answer", ""), update.get("sift_answer", "")]
                if "nn_answer" in update and "nn" not in update:  # only the answers moved: the panels stay
                    yield [update.get("status", ""), skip(), skip(), skip(), answers[0], skip(), skip(), answers[1]]
                    continue
                nn, sift, shared = update.get("nn"), update.get("sift"), update.get("shared", set())
                yield [update.get("status", ""), render_variance(sift, nn),
                       render_coverage(nn, " "), render_passages(nn, shared), answers[0],
                       render_coverage(sift, " "), render_passages(sift, shared), answers[1]]

        compare_go.click(on_compare, [compare_prompt, *settings],
                         [compare_status, compare_chart, nn_coverage, nn_picks, nn_answer,
                          sift_coverage, sift_picks, sift_answer],
                         concurrency_id="model", concurrency_limit=1, show_progress_on=[compare_status])

        # corpus
        def on_ingest(files, path, shared, request: gr.Request, profile: gr.OAuthProfile | None,
                      progress=gr.Progress()):
            caller = who(request, profile)
            result = h.ingest(files, path, lambda fraction, text: progress(fraction, desc=text), caller=caller,
                              shared=shared)
            if result["error"]:
                gr.Warning(result["error"])
            return [result["report"], None, *corpus_view(caller)]

        # the ingests' own line: a chat never waits behind an ingest (the service shares the embedder)
        ingest_go.click(on_ingest, [uploads, folder, to_shared], [ingest_report, uploads, *corpus_outputs],
                        concurrency_id="ingest", concurrency_limit=1)

        def on_sample(request: gr.Request, profile: gr.OAuthProfile | None, progress=gr.Progress()):
            caller = who(request, profile)
            result = h.add_sample(lambda fraction, text: progress(fraction, desc=text), caller=caller)
            return [result["report"], *corpus_view(caller)]

        add_sample.click(on_sample, None, [ingest_report, *corpus_outputs],
                         concurrency_id="ingest", concurrency_limit=1)

        def on_remove(document_id, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            return [h.remove_document(document_id, caller), *corpus_view(caller)]

        remove.click(on_remove, [document], [remove_report, *corpus_outputs])

        # synced folders: a pass waits in the ingests' line, never the model's
        def on_sync_add(path, shared, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            return [h.sync_folder(path, shared, caller), *corpus_view(caller)]

        sync_add.click(on_sync_add, [sync_path, sync_shared], [sync_report, *corpus_outputs])

        def on_sync_now(folder_id, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            return [h.sync_now(folder_id, caller), *corpus_view(caller)]

        sync_now.click(on_sync_now, [synced], [sync_report, *corpus_outputs], concurrency_id="ingest",
                       concurrency_limit=1)

        def on_sync_refresh(request: gr.Request, profile: gr.OAuthProfile | None):
            return corpus_view(who(request, profile))

        sync_refresh.click(on_sync_refresh, None, corpus_outputs)

        def on_sync_stop(folder_id, remove, request: gr.Request, profile: gr.OAuthProfile | None):
            caller = who(request, profile)
            return [h.stop_syncing(folder_id, remove, caller), *corpus_view(caller)]

        sync_stop.click(on_sync_stop, [synced, sync_remove], [sync_report, *corpus_outputs])

        def on_search(text, request: gr.Request, profile: gr.OAuthProfile | None):
            return h.search(text, who(request, profile))

        search_text.submit(on_search, [search_text], [search_results], concurrency_id="search", concurrency_limit=2)
        search_go.click(on_search, [search_text], [search_results], concurrency_id="search", concurrency_limit=2)

        # documents: the pane's "open" event carries {passage, number} (or {document}); what the
        # caller may read is the service's to say, whatever a client puts there
        def on_open_document(event: gr.EventData, request: gr.Request, profile: gr.OAuthProfile | None):
            data = event._data if isinstance(event._data, dict) else {}
            try:
                return h.open_document(data.get("passage"), who(request, profile), document_id=data.get("document"),
                                       number=data.get("number"))
            except NotReadable as refused:
                raise gr.Error(str(refused), print_exception=False) from None

        document_pane.open(on_open_document, None, [document_pane], api_name="open_document",
                           concurrency_id="document", concurrency_limit=4)

        # a row of the documents table opens that document from its beginning
        def on_document_row(selected: gr.SelectData, request: gr.Request, profile: gr.OAuthProfile | None):
            try:
                return h.open_listed_document(selected.row_value, who(request, profile))
            except NotReadable as refused:
                raise gr.Error(str(refused), print_exception=False) from None

        documents.select(on_document_row, None, [document_pane], api_name="open_listed_document",
                         concurrency_id="document", concurrency_limit=4)

    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


def request_caller(access: Access, request) -> Caller:
    """The caller of a raw request to Gradio's app (a starlette Request whose scope Gradio's app
    has seen), from what the server keeps, as Gradio hands it to the handlers (`who`): the
    sign-in cookie's entry in Gradio's token table, or the OAuth session on a Space."""
    username = hf_username = None
    app = request.scope.get("app") if request is not None else None
    if access.mode == "users" and app is not None and hasattr(app, "tokens"):
        cookie_id = getattr(app, "cookie_id", "")
        token = request.cookies.get(f"access-token-{cookie_id}") or \
            request.cookies.get(f"access-token-unsecure-{cookie_id}")
        username = app.tokens.get(token) if token else None
    if access.mode == "space" and request is not None and "session" in request.scope:
        from gradio.oauth import _get_valid_oauth_info_from_session

        info = _get_valid_oauth_info_from_session(request.session)
        hf_username = (info or {}).get("userinfo", {}).get("preferred_username")
    return access.caller(username, hf_username)


def app_middleware(demo) -> list:
    """The middleware inside Gradio's app, for `mount_gradio_app` and `launch` alike."""
    from starlette.middleware import Middleware

    from .guard import UploadGate

    return [Middleware(UploadGate, blocks=demo)]


# -- loading and serving -----------------------------------------------------------------------


def sign_in(access: Access) -> dict:
    """Gradio's own sign-in for a users file (its login page, a session cookie it checks on every
    call), as keyword arguments of `mount_gradio_app` or `launch`; nothing otherwise."""
    if access.mode != "users":
        return {}
    return {"auth": access.check_password,
            "auth_message": "Sign in to sift-chat (an administrator adds users: `python -m sift_chat users add`)."}


THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "monospace"])  # no web fonts: offline


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Serve the app alone, through Gradio's own server (blocks until stopped unless
    prevent_thread_lock=True). `sift_chat.server` serves it with the API instead."""
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES,
                       show_error=True, theme=THEME, css=CSS, **{**PRIVATE, **kwargs})
