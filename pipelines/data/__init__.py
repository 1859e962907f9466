"""The data stage: readers, cleaning, filters, PII, dedup, tokenizer and packing (Ray Data)."""
