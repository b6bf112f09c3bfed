"""The base model: build and fill, layers, quantized storage, sources (Hub, import), tokenizer."""
