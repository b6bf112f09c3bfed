"""Repository tools: scripts that maintain files of this repository (not part of the installed package)."""
