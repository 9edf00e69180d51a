"""The package's public API: `dir(loratrace)` lists it, each name resolves, and `import loratrace` stays light."""

import subprocess
import sys

import loratrace

PUBLIC = ["BatchTracker", "Config", "__version__", "compare", "export_adapters", "influence", "load_config",
          "open_runs", "replay", "replays", "resume_sweep", "sweep", "train", "verify", "write_report"]


def test_dir_lists_the_public_api_and_each_name_resolves():
    assert dir(loratrace) == PUBLIC
    assert sorted(loratrace.__all__) == sorted(loratrace._EXPORTS) == [name for name in PUBLIC if name != "__version__"]
    for name in PUBLIC:
        value = getattr(loratrace, name)
        assert value is not None and (name == "__version__" or value.__name__ == name), name
    assert loratrace.train.__module__ == "loratrace.recipe"
    assert loratrace.open_runs.__module__ == "loratrace.query.store"


def test_import_and_dir_import_neither_torch_nor_transformers_nor_pandas():
    code = ("import sys, loratrace; names = dir(loratrace); "
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'lightning') if m in sys.modules]; "
            "print(','.join(names)); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(",") == PUBLIC
