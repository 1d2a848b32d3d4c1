"""Ground floor: atomic files (``files``), JSON Lines (``jsonl``), derived seeds and hashes (``seeds``), YAML
params files (``yamlfile``), small shared checks (``checks``) and markdown tables (``markdown``).
Imports nothing of the package but :mod:`reflectevo.errors`."""
