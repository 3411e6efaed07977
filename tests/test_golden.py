"""Every method's records on the embedded model equal the committed golden ones (tests/golden).

Slow (about 3 minutes): run it after a restructuring, ``python -m pytest -m slow tests/test_golden.py``,
or ``python tests/golden/check.py`` for a per-method report.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import check  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", list(check.CASES))
def test_records_equal_the_golden_ones(name, tmp_path):
    differences = check.differences(name, check.run_case(name, tmp_path))
    assert not differences, "\n".join(differences[:20])
