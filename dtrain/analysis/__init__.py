"""The LoRA paper's Section 7 analyses of trained adapters (`dtrain analyze`).

subspace.py  similarity of the subspaces two adapters' A matrices span (Sec. 7.2, Figs. 3-4)
delta.py     the update ΔW = (alpha / r) B A: its spectrum, effective rank, and how it relates to
             the frozen W (Sec. 7.3, Table 7: ||U^T W V||_F and the amplification factor)
weights.py   the base's weights, one tensor at a time from safetensors (dequantized if asked)
run.py       all of it over every adapted layer of one or more adapters, averaged per layer type
report.py    the json and markdown tables and the PNGs
"""
