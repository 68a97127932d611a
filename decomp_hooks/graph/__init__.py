"""Attribution graphs between causally important components for one prompt (docs/graphs.md)."""
