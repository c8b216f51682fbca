"""Training data: record format (`records`), Table 6/7 instructions (`templates`), NV-Embed
tokenisation and pool mask (`tokenization`), `--train-data` sources (`loading`), blended
rank-invariant resumable batches (`blending`), collation for the loss (`collate`), one rank's
batches end to end (`pipeline`) and a locally trained toy tokenizer (`toy_tokenizer`).

Submodules are imported explicitly (`from megatron_nvembed.data.records import Record`) so that
reading records never pays for importing torch or transformers. See docs/data.md.
"""
