"""MST-CLIPIQA: multi-scale two-stream CLIP quality assessment for AI-generated images."""

__version__ = "0.1.0"
