"""Generation and evaluation with a base, adapters or a merged model."""
