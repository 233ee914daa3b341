"""The top-level namespace: `import pdeformer` loads the library's concepts, nothing more."""

import subprocess
import sys

import pytest

import pdeformer as pf

_PROGRAM = """
import sys
import pdeformer
print(sorted(m for m in ("pdeformer.data", "pdeformer.training", "PIL", "sklearn")
             if m in sys.modules))
"""


def test_import_does_not_load_the_data_package_or_the_training_loop():
    run = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_data_and_training_load_on_first_use():
    assert pf.data.Batch.__module__ == "pdeformer.data.batching"
    assert callable(pf.training.train)
    from pdeformer import data, training

    assert data is pf.data and training is pf.training


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'pdeformer' has no attribute 'no_such_name'"):
        pf.no_such_name  # noqa: B018
