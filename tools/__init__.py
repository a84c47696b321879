"""Stand-alone tools: each pipeline stage run by itself (see docs/tools.md)."""
