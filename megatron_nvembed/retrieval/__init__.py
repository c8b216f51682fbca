"""Corpus-scale retrieval shared by `tools/embed.py`, hard-negative mining and BEIR evaluation.

- `corpus.JsonlCorpus`: a JSONL corpus checked once and read back by row range (no texts held).
- `shards.encode_corpus`: embeddings in atomically written, resumable shards, split over
  data-parallel ranks; `shards.ShardedEmbeddings` reads them back memory-mapped.
- `search.search`: top-k inner-product search over the shards with FAISS (exact, or an
  approximate index for corpora that do not fit in memory).

The encoder itself is an `evaluation.embedder.Embedder` (`evaluation.encoder.load_embedder`: any
checkpoint, NV-Embed-format folder or sentence-transformers model), passed in by the caller.
"""
