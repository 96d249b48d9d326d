"""sift-chat: a chat app over your own documents that learns at test time (SIFT + LoRA)."""

__version__ = "0.1.0"
