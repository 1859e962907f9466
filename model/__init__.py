"""The network and everything about it that needs no Ray: configs and presets, the Llama-style
decoder, generation, the tokenizer and chat template, and checkpoint I/O."""
