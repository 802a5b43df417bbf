"""Data: packing text into training rows, the built-in knowledge set, offline natural text."""
