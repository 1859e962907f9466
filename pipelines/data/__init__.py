"""The data stage: readers, cleaning, filters, PII, dedup, tokenizer and packing (Ray tasks over Arrow blocks; Ray Data for large dedup shuffles)."""
