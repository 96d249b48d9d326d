"""Start sift-chat: `python app.py` serves the app on http://127.0.0.1:7860 and the
OpenAI-compatible API on http://127.0.0.1:7860/v1 (`sift_chat/server.py`).

The same file is the entry point of a Hugging Face Space (sdk: gradio, see the README's front
matter): there Gradio's environment sets the host and port, and the chat model comes from the Hub
unless $SIFT_CHAT_MODEL says otherwise.
"""

from __future__ import annotations

import sys

from sift_chat.server import default_chat_model, main, parse_args  # noqa: F401  (the Space's entry point)

if __name__ == "__main__":
    sys.exit(main())
