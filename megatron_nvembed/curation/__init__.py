"""Offline curation: non-retrieval datasets to training records, BM25 decontamination,
positive-aware hard-negative mining."""
