"""Batch tracking: Arrow schemas, the background writer, the tracker callback, the checkpoint mappings."""
