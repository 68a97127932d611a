"""Harvest: one resumable streaming pass over a corpus that keeps per-component statistics in bounded memory."""
