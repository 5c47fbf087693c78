"""curate: a data curation pipeline for image-text corpora, on Ray."""

__version__ = "0.1.0"
